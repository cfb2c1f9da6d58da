//! GRPO: group-normalised advantages and the clipped surrogate per completion token,
//!
//! `ℓ_t = −min(ρ_t·A, clip(ρ_t, 1−ε_low, 1+ε_high)·A) + β·KL_t`, with
//! `ρ_t = exp(log πθ − log πold)` and the k3 estimator
//! `KL_t = e^{ref−θ} − (ref−θ) − 1` against the reference policy,
//!
//! then aggregated over tokens as TRL's `loss_type` says. Tokens are flat `[N]` tensors with
//! the completion (`0..B`) each belongs to, so no `[B, T]` padding is ever built.

use std::str::FromStr;

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

use super::super::{Metrics, mean, values};

/// How rewards are scaled into advantages (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    /// Divide by the group's standard deviation.
    Group,
    /// Divide by the standard deviation over the whole generation batch.
    Batch,
    /// Centre only (Dr. GRPO).
    None,
}

impl FromStr for ScaleRewards {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "group" => Ok(Self::Group),
            "batch" => Ok(Self::Batch),
            "none" => Ok(Self::None),
            other => Err(format!(
                "grpo.scale_rewards `{other}` is not one of group, batch, none"
            )),
        }
    }
}

/// How per-token losses become a micro-batch loss (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpoLossType {
    /// The mean over completions of each completion's token mean.
    Grpo,
    /// Token sum ÷ token count of the micro-batch.
    Bnpo,
    /// Token sum ÷ (completions × `max_completion_length`).
    DrGrpo,
    /// Token sum ÷ active tokens of the whole accumulated batch.
    Dapo,
}

impl FromStr for GrpoLossType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "grpo" => Ok(Self::Grpo),
            "bnpo" => Ok(Self::Bnpo),
            "dr_grpo" => Ok(Self::DrGrpo),
            "dapo" => Ok(Self::Dapo),
            other => Err(format!(
                "grpo.loss_type `{other}` is not one of grpo, bnpo, dr_grpo, dapo"
            )),
        }
    }
}

/// The sample standard deviation (Bessel-corrected, as `torch.std`); 0 for fewer than two.
fn std(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

/// Advantages of `rewards`, laid out as consecutive groups of `group` completions of one
/// prompt: `A = (r − mean_group) / (std + 1e-4)`, the std per `scale`. Also TRL's
/// `reward`, `reward_std` and `frac_reward_zero_std`.
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> (Vec<f64>, Metrics) {
    let group = group.max(1);
    let batch_std = std(rewards);
    let mut out = Vec::with_capacity(rewards.len());
    let (mut stds, mut zero_std) = (Vec::new(), 0usize);
    for g in rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        let s = std(g);
        stds.push(s);
        // TRL counts the spread the advantages divide by: the batch's under batch scaling.
        let spread = if scale == ScaleRewards::Batch {
            batch_std
        } else {
            s
        };
        if spread.abs() < 1e-8 {
            zero_std += 1;
        }
        let denominator = match scale {
            ScaleRewards::Group => s + 1e-4,
            ScaleRewards::Batch => batch_std + 1e-4,
            ScaleRewards::None => 1.0,
        };
        out.extend(g.iter().map(|r| (r - mean) / denominator));
    }
    let groups = stds.len().max(1) as f64;
    let mut m = Metrics::default();
    m.mean("reward", mean(rewards));
    let reported_std = match scale {
        ScaleRewards::Batch => batch_std,
        _ => stds.iter().sum::<f64>() / groups,
    };
    m.mean("reward_std", reported_std);
    m.mean("frac_reward_zero_std", zero_std as f64 / groups);
    (out, m)
}

/// Per-token inputs of the surrogate, all `[N]`.
pub struct TokenTerms {
    /// log πθ of each completion token (carries the gradient).
    pub logp: Tensor<1>,
    /// log πold: the sampling policy's log-probs, or `logp` detached when samples are used
    /// once (then ρ = 1 but its gradient is the policy gradient).
    pub old: Tensor<1>,
    /// log πref, when β > 0.
    pub reference: Option<Tensor<1>>,
    /// The advantage of each token's completion.
    pub advantage: Tensor<1>,
}

/// Clipping thresholds and the KL weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Surrogate {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
}

/// Per-token losses `[N]`, and per-token indicators `[N]` for the metrics: the k3 KL (when
/// β > 0), and whether the ratio was clipped below (ρ < 1−ε_low with A < 0) or above
/// (ρ > 1+ε_high with A > 0), which are the cases where the clip removes the gradient.
pub fn per_token_loss(
    terms: &TokenTerms,
    s: Surrogate,
) -> (Tensor<1>, Option<Tensor<1>>, Tensor<1>, Tensor<1>) {
    let ratio = (terms.logp.clone() - terms.old.clone()).exp();
    let a = terms.advantage.clone();
    let unclipped = ratio.clone() * a.clone();
    let clipped = ratio
        .clone()
        .clamp(1.0 - s.epsilon_low, 1.0 + s.epsilon_high)
        * a.clone();
    let mut loss = unclipped.min_pair(clipped).neg();
    let kl = match (&terms.reference, s.beta > 0.0) {
        (Some(reference), true) => {
            let d = reference.clone() - terms.logp.clone();
            let kl = d.clone().exp() - d - 1.0;
            loss = loss + kl.clone().mul_scalar(s.beta);
            Some(kl)
        }
        _ => None,
    };
    let ratio = ratio.detach();
    let low = ratio
        .clone()
        .lower_elem(1.0 - s.epsilon_low)
        .bool_and(a.clone().lower_elem(0.0))
        .float();
    let high = ratio
        .greater_elem(1.0 + s.epsilon_high)
        .bool_and(a.greater_elem(0.0))
        .float();
    (loss, kl, low, high)
}

/// Which completion each token belongs to, and which tokens count. Built on the host, where
/// the counts are known, so aggregating needs no read-back from the device.
pub struct TokenLayout {
    /// `[N]`: the completion (`0..completions`) of each token.
    pub seq: Tensor<1, Int>,
    /// `[N]`: 1 for tokens in the loss, 0 for masked ones (truncated completions).
    pub mask: Tensor<1>,
    /// `[completions]`: tokens in the loss per completion.
    pub counts: Tensor<1>,
    /// Tokens in the loss, in all.
    pub active: f64,
    pub completions: usize,
}

impl TokenLayout {
    /// `lens`: each completion's tokens, in order; `counted`: whether it is in the loss.
    pub fn new(lens: &[usize], counted: &[bool], device: &Device) -> Self {
        let n: usize = lens.iter().sum();
        let (mut seq, mut mask) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut counts = Vec::with_capacity(lens.len());
        for (k, (&len, &c)) in lens.iter().zip(counted).enumerate() {
            seq.extend(std::iter::repeat_n(k as i64, len));
            mask.extend(std::iter::repeat_n(f32::from(u8::from(c)), len));
            counts.push(if c { len as f32 } else { 0.0 });
        }
        let active = counts.iter().map(|&c| c as f64).sum();
        let b = lens.len();
        Self {
            seq: Tensor::from_data(TensorData::new(seq, [n]), device),
            mask: Tensor::from_data(TensorData::new(mask, [n]), device),
            counts: Tensor::from_data(TensorData::new(counts, [b]), device),
            active,
            completions: b,
        }
    }
}

/// The micro-batch loss and its weight in the step, whose loss is `Σ wᵢ·lossᵢ / Σ wᵢ` over
/// its micro-batches — the loop's rule. The weights make each type's normaliser come out
/// as TRL defines it: per micro-batch for `bnpo` (equal weights), over the accumulated
/// batch's active tokens for `dapo` (weights = active tokens), and per completion for
/// `grpo` and `dr_grpo` (weights = completions).
pub fn aggregate(
    per_token: Tensor<1>,
    layout: &TokenLayout,
    kind: GrpoLossType,
    max_completion_length: usize,
) -> (Tensor<1>, f64) {
    let masked = per_token * layout.mask.clone();
    let active = layout.active;
    let b = layout.completions;
    match kind {
        GrpoLossType::Grpo => {
            let sums = Tensor::<1>::zeros([b], &masked.device()).select_assign(
                0,
                layout.seq.clone(),
                masked,
                IndexingUpdateOp::Add,
            );
            (
                (sums / layout.counts.clone().clamp_min(1.0)).mean(),
                b as f64,
            )
        }
        GrpoLossType::Bnpo => (masked.sum().div_scalar(active.max(1.0)), 1.0),
        GrpoLossType::DrGrpo => (
            masked
                .sum()
                .div_scalar((b * max_completion_length).max(1) as f64),
            b as f64,
        ),
        GrpoLossType::Dapo => (masked.sum().div_scalar(active.max(1.0)), active),
    }
}

/// The masked token mean of `x`, for metrics.
pub fn token_mean(x: Tensor<1>, layout: &TokenLayout) -> f64 {
    if layout.active <= 0.0 {
        return 0.0;
    }
    values((x.detach() * layout.mask.clone()).sum())[0] / layout.active
}

#[cfg(test)]
mod tests {
    use super::super::super::test_util::{close, t};
    use super::*;

    #[test]
    fn advantages_by_group_batch_and_none() {
        // Two groups of three: [1, 2, 3] and [5, 5, 5] (no spread).
        let r = [1.0, 2.0, 3.0, 5.0, 5.0, 5.0];
        let (a, m) = advantages(&r, 3, ScaleRewards::Group);
        // Group 1: mean 2, sample std 1.
        for (got, want) in a.iter().zip([-1.0, 0.0, 1.0]) {
            close(*got, want / (1.0 + 1e-4), 1e-12);
        }
        assert!(a[3..].iter().all(|&x| x == 0.0));
        close(m.get("reward").unwrap(), 21.0 / 6.0, 1e-12);
        close(m.get("reward_std").unwrap(), 0.5, 1e-12);
        close(m.get("frac_reward_zero_std").unwrap(), 0.5, 1e-12);

        // Batch: one std over all six, mean still per group.
        let mean = 21.0 / 6.0;
        let batch_std = (r.iter().map(|x: &f64| (x - mean).powi(2)).sum::<f64>() / 5.0).sqrt();
        let (a, m) = advantages(&r, 3, ScaleRewards::Batch);
        close(a[0], -1.0 / (batch_std + 1e-4), 1e-12);
        close(m.get("reward_std").unwrap(), batch_std, 1e-12);
        // The batch has spread, so no completion's advantage divides by a zero std.
        close(m.get("frac_reward_zero_std").unwrap(), 0.0, 1e-12);
        let (_, m) = advantages(&[2.0; 6], 3, ScaleRewards::Batch);
        close(m.get("frac_reward_zero_std").unwrap(), 1.0, 1e-12);
        let (a, m) = advantages(&r, 3, ScaleRewards::None);
        assert_eq!(a, vec![-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        close(m.get("frac_reward_zero_std").unwrap(), 0.5, 1e-12);
    }

    /// Four tokens, hand-computed: ρ = e^{θ−old}; the clip only binds where it lowers the
    /// objective; k3 KL = e^{ref−θ} − (ref−θ) − 1.
    #[test]
    fn surrogate_clipping_and_k3_kl() {
        let logp = [-1.0, -1.0, -2.0, -0.5];
        let old = [-1.0, -1.5, -1.0, -0.5];
        let reference = [-1.2, -1.0, -2.5, -0.1];
        let adv = [1.0, 1.0, -2.0, -1.0];
        let s = Surrogate {
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            beta: 0.04,
        };
        let terms = TokenTerms {
            logp: t(&logp),
            old: t(&old),
            reference: Some(t(&reference)),
            advantage: t(&adv),
        };
        let (loss, kl, low, high) = per_token_loss(&terms, s);
        let (loss, kl) = (values(loss), values(kl.unwrap()));
        for i in 0..4 {
            let rho = (logp[i] - old[i]).exp();
            let clipped = rho.clamp(0.8, 1.28);
            let surrogate = -(rho * adv[i]).min(clipped * adv[i]);
            let d = reference[i] - logp[i];
            let k3 = d.exp() - d - 1.0;
            close(kl[i], k3, 1e-6);
            close(loss[i], surrogate + 0.04 * k3, 1e-6);
        }
        // Token 1: ρ = e^0.5 ≈ 1.65 > 1.28 with A > 0 → clipped high, loss −1.28.
        close(loss[1] - 0.04 * kl[1], -1.28, 1e-6);
        // Token 2: ρ = e^−1 ≈ 0.37 < 0.8 with A < 0 → clipped low, loss 1.6.
        close(loss[2] - 0.04 * kl[2], 1.6, 1e-6);
        assert_eq!(values(low), vec![0.0, 0.0, 1.0, 0.0]);
        assert_eq!(values(high), vec![0.0, 1.0, 0.0, 0.0]);

        // β = 0 skips the KL term even with a reference.
        let (loss0, kl0, _, _) = per_token_loss(&terms, Surrogate { beta: 0.0, ..s });
        assert!(kl0.is_none());
        close(values(loss0)[0], -1.0, 1e-6);
    }

    /// Two micro-batches combined by the loop's rule `Σ wᵢ·lossᵢ / Σ wᵢ`, against each
    /// type's definition over the whole step.
    #[test]
    fn loss_aggregations_match_trl_definitions() {
        // Micro 1: three completions of 2, 1 and 1 tokens; micro 2: one of 3 tokens plus
        // one truncated (masked) completion of 2 tokens. The micro-batches differ in
        // completions (3 vs 2) and active tokens (4 vs 3), so every weighting of them gives
        // a different number: each expected value below is one definition only.
        let l1 = [1.0, 3.0, 5.0, 9.0];
        let l2 = [2.0, 2.0, 11.0, 100.0, 100.0];
        let device = Device::flex();
        let lay1 = TokenLayout::new(&[2, 1, 1], &[true, true, true], &device);
        let lay2 = TokenLayout::new(&[3, 2], &[true, false], &device);
        assert_eq!(
            lay2.seq
                .clone()
                .into_data()
                .try_into_vec_as::<i64>()
                .unwrap(),
            vec![0, 0, 0, 1, 1]
        );
        assert_eq!(values(lay2.mask.clone()), vec![1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!((lay1.active, lay2.active), (4.0, 3.0));
        let max_len = 4;
        let step = |kind| {
            let (a, wa) = aggregate(t(&l1), &lay1, kind, max_len);
            let (b, wb) = aggregate(t(&l2), &lay2, kind, max_len);
            (values(a)[0] * wa + values(b)[0] * wb) / (wa + wb)
        };
        // grpo: completion means 2, 5, 9, 5 and 0 (masked) → 21/5 (equal micro weights
        // would give (16/3 + 5/2)/2 ≈ 3.92).
        close(step(GrpoLossType::Grpo), 21.0 / 5.0, 1e-6);
        // bnpo: micro means 18/4 and 15/3, averaged (token weights would give 33/7).
        close(step(GrpoLossType::Bnpo), (4.5 + 5.0) / 2.0, 1e-6);
        // dr_grpo: token sums over B × max_len with B = 5 completions (equal micro weights
        // would give (18/12 + 15/8)/2 = 1.6875).
        close(step(GrpoLossType::DrGrpo), 33.0 / (5.0 * 4.0), 1e-6);
        // dapo: all active tokens of the step: 33 / 7.
        close(step(GrpoLossType::Dapo), 33.0 / 7.0, 1e-6);
        close(token_mean(t(&l2), &lay2), 5.0, 1e-6);
    }

    /// With samples used once (old = θ detached) the ratio is 1 and the loss's gradient is
    /// the policy gradient: ∂ℓ_t/∂logp_t = −A inside the clip range.
    #[test]
    fn on_policy_gradient_is_minus_the_advantage() {
        let device = Device::flex().autodiff();
        let logp = Tensor::<1>::from_data(TensorData::new(vec![-1.0f32, -2.0, -0.5], [3]), &device)
            .require_grad();
        let terms = TokenTerms {
            logp: logp.clone(),
            old: logp.clone().detach(),
            reference: None,
            advantage: Tensor::from_data(TensorData::new(vec![0.5f32, -1.5, 2.0], [3]), &device),
        };
        let s = Surrogate {
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
        };
        let (loss, _, _, _) = per_token_loss(&terms, s);
        let grads = loss.sum().backward();
        let g = logp.grad(&grads).unwrap();
        let g = g.into_data().try_into_vec_as::<f64>().unwrap();
        assert_eq!(g, vec![-0.5, 1.5, -2.0]);
    }
}
