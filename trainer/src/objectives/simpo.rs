//! SimPO, reference-free: on length-averaged completion log-probs `lp`,
//! `Δ = β·(lp_c − lp_r) − γ`, `loss = −(1−ε)·log σ(Δ) − ε·log σ(−Δ)`, the target margin γ
//! asking the chosen completion to win by more than a tie. TRL's `CPOTrainer` with
//! `loss_type = "simpo"` and `cpo_alpha = 0`.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::fits_f32;
use super::objective::{LossInput, MicroOutput, Objective};
use super::pairs::Pairs;
use super::sequences::LogitsOver;
use super::{Metrics, scaled_preference_metrics, smoothed_sigmoid_loss};
use crate::Result;
use crate::examples::{Micro, Shape};
use crate::recipe::Recipe;

/// `[simpo]`. The defaults are the SimPO paper's (β = 2, γ/β = 0.5).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimpoSection {
    /// β, the scale of the length-averaged log-ratio.
    pub beta: f64,
    /// γ, the target reward margin (TRL's `simpo_gamma`).
    pub gamma: f64,
    pub label_smoothing: f64,
}

impl Default for SimpoSection {
    fn default() -> Self {
        Self {
            beta: 2.0,
            gamma: 1.0,
            label_smoothing: 0.0,
        }
    }
}

/// SimPO with its settings.
pub struct Simpo(SimpoSection);

/// The registry's constructor: the `[simpo]` section (or its defaults), checked.
pub fn build(recipe: &Recipe) -> std::result::Result<Box<dyn Objective>, String> {
    let s = recipe.simpo.clone().unwrap_or_default();
    if !(s.beta > 0.0 && fits_f32(s.beta)) {
        return Err(format!(
            "simpo.beta {} must be positive (and within f32)",
            crate::recipe::shown(s.beta)
        ));
    }
    if !fits_f32(s.gamma) {
        return Err(format!(
            "simpo.gamma {} must be finite (and within f32)",
            crate::recipe::shown(s.gamma)
        ));
    }
    if !(0.0..0.5).contains(&s.label_smoothing) {
        return Err(format!(
            "simpo.label_smoothing {} must be in [0, 0.5)",
            s.label_smoothing
        ));
    }
    Ok(Box::new(Simpo(s)))
}

/// The SimPO loss over `[N]` length-averaged log-probs, and TRL's metrics (rewards are
/// `β·lp`, as TRL's CPO logs them).
pub fn simpo_loss(
    beta: f64,
    gamma: f64,
    label_smoothing: f64,
    avg_chosen: Tensor<1>,
    avg_rejected: Tensor<1>,
) -> (Tensor<1>, Metrics) {
    let eps = label_smoothing;
    let delta = (avg_chosen.clone() - avg_rejected.clone())
        .mul_scalar(beta)
        .sub_scalar(gamma);
    let loss = smoothed_sigmoid_loss(delta, eps).mean();
    (
        loss,
        scaled_preference_metrics(beta, avg_chosen, avg_rejected),
    )
}

impl Objective for Simpo {
    fn name(&self) -> &'static str {
        "simpo"
    }

    fn shape(&self) -> Shape {
        Shape::Pairs
    }

    fn summary_keys(&self) -> &'static [&'static str] {
        &["rewards/accuracies", "rewards/margins"]
    }

    fn loss(&self, input: &LossInput, micro: &Micro) -> Result<Option<MicroOutput>> {
        let Some(pairs) = Pairs::gather(input, micro, self.name())? else {
            return Ok(None);
        };
        // SimPO is TRL's CPO trainer, which averages the logits over every position.
        let (policy, _) = pairs.policy_with_stats(input, LogitsOver::AllPositions);
        let (c, r) = policy.length_averaged();
        let s = &self.0;
        let (loss, mut m) = simpo_loss(s.beta, s.gamma, s.label_smoothing, c, r);
        if let Some(t) = policy.tokens {
            t.log(&mut m);
        }
        Ok(Some(pairs.output((loss, m))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, ls, t};
    use super::super::values;
    use super::*;

    #[test]
    fn loss_and_metrics_match_the_formula() {
        // Length-averaged log-probs of two pairs.
        let (c, r) = ([-0.5, -1.5], [-1.0, -1.25]);
        let (beta, gamma, eps) = (2.0, 0.5, 0.1);
        let (loss, m) = simpo_loss(beta, gamma, eps, t(&c), t(&r));
        // Δ = 2·0.5 − 0.5 = 0.5 and 2·(−0.25) − 0.5 = −1.
        let want = [0.5, -1.0]
            .iter()
            .map(|&d: &f64| -(1.0 - eps) * ls(d) - eps * ls(-d))
            .sum::<f64>()
            / 2.0;
        close(values(loss)[0], want, 1e-6);
        close(m.get("rewards/chosen").unwrap(), -2.0, 1e-6);
        close(m.get("rewards/rejected").unwrap(), 2.0 * -1.125, 1e-6);
        close(m.get("rewards/margins").unwrap(), (1.0 - 0.5) / 2.0, 1e-6);
        close(m.get("rewards/accuracies").unwrap(), 0.5, 0.0);
        close(m.get("logps/chosen").unwrap(), -1.0, 1e-6);
    }

    /// γ is a margin in reward units: with equal log-probs the loss is `−log σ(−γ)`, not
    /// log 2, and it shrinks as the chosen side wins by more than γ/β.
    #[test]
    fn gamma_is_a_target_margin() {
        let (loss, _) = simpo_loss(2.0, 1.0, 0.0, t(&[-1.0]), t(&[-1.0]));
        close(values(loss)[0], -ls(-1.0), 1e-6);
        let (loss, _) = simpo_loss(2.0, 1.0, 0.0, t(&[-0.5]), t(&[-1.0]));
        close(values(loss)[0], 2f64.ln(), 1e-6);
    }

    #[test]
    fn gradient_is_sigma_of_minus_delta() {
        use burn::tensor::{Device, TensorData};
        let device = Device::flex().autodiff();
        let c = Tensor::<1>::from_data(TensorData::new(vec![-0.5f32], [1]), &device).require_grad();
        let r = Tensor::<1>::from_data(TensorData::new(vec![-1.0f32], [1]), &device);
        let (loss, _) = simpo_loss(2.0, 1.0, 0.0, c.clone(), r);
        let grads = loss.backward();
        let g = values(c.grad(&grads).unwrap())[0];
        // dℓ/dlp_c = −β·σ(−Δ), Δ = 0 here: −2·½.
        close(g, -1.0, 1e-6);
    }
}
