//! Contrastive Preference Optimization, reference-free: on summed completion log-probs
//! `lp`, `Δ = β·(lp_c − lp_r)`,
//! `loss = mean(−(1−ε)·log σ(Δ) − ε·log σ(−Δ)) + α·NLL(chosen completions)`, as TRL's
//! `CPOTrainer` with `loss_type = "sigmoid"` (α is `cpo_alpha`).

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::fits_f32;
use super::objective::{LossInput, MicroOutput, Objective};
use super::pairs::Pairs;
use super::sequences::LogitsOver;
use super::{Metrics, scaled_preference_metrics, smoothed_sigmoid_loss, values};
use crate::Result;
use crate::examples::{Micro, Shape};
use crate::recipe::Recipe;

/// `[cpo]`, with TRL's names and defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CpoSection {
    pub beta: f64,
    /// The weight of the chosen completions' NLL (behaviour cloning); 0 drops it.
    pub cpo_alpha: f64,
    pub label_smoothing: f64,
}

impl Default for CpoSection {
    fn default() -> Self {
        Self {
            beta: 0.1,
            cpo_alpha: 1.0,
            label_smoothing: 0.0,
        }
    }
}

/// CPO with its settings.
pub struct Cpo(CpoSection);

/// The registry's constructor: the `[cpo]` section (or its defaults), checked.
pub fn build(recipe: &Recipe) -> std::result::Result<Box<dyn Objective>, String> {
    let s = recipe.cpo.clone().unwrap_or_default();
    if !(s.beta > 0.0 && fits_f32(s.beta)) {
        return Err(format!(
            "cpo.beta {} must be positive (and within f32)",
            crate::recipe::shown(s.beta)
        ));
    }
    if !(s.cpo_alpha >= 0.0 && fits_f32(s.cpo_alpha)) {
        return Err(format!(
            "cpo.cpo_alpha {} must be non-negative",
            s.cpo_alpha
        ));
    }
    if !(0.0..0.5).contains(&s.label_smoothing) {
        return Err(format!(
            "cpo.label_smoothing {} must be in [0, 0.5)",
            s.label_smoothing
        ));
    }
    Ok(Box::new(Cpo(s)))
}

/// The CPO loss over `[N]` summed log-probs and the chosen side's token-mean NLL (a
/// scalar), with TRL's metrics (rewards are `β·lp`).
pub fn cpo_loss(
    beta: f64,
    alpha: f64,
    label_smoothing: f64,
    nll: Tensor<1>,
    chosen: Tensor<1>,
    rejected: Tensor<1>,
) -> (Tensor<1>, Metrics) {
    let eps = label_smoothing;
    let delta = (chosen.clone() - rejected.clone()).mul_scalar(beta);
    let loss = smoothed_sigmoid_loss(delta, eps).mean() + nll.clone().mul_scalar(alpha);
    let mut m = scaled_preference_metrics(beta, chosen, rejected);
    m.mean("nll_loss", values(nll.detach())[0]);
    (loss, m)
}

impl Objective for Cpo {
    fn name(&self) -> &'static str {
        "cpo"
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
        // TRL's CPO averages the logits over every position.
        let (policy, all) = pairs.policy_with_stats(input, LogitsOver::AllPositions);
        // TRL's CPO masks the prompt out of the NLL's labels.
        let nll = pairs.chosen_nll(&policy, all, true);
        let s = &self.0;
        let (loss, mut m) = cpo_loss(
            s.beta,
            s.cpo_alpha,
            s.label_smoothing,
            nll,
            policy.chosen.clone(),
            policy.rejected.clone(),
        );
        if let Some(t) = policy.tokens {
            t.log(&mut m);
        }
        Ok(Some(pairs.output((loss, m))))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, ls, t};
    use super::*;

    #[test]
    fn loss_and_metrics_match_the_formula() {
        let (c, r) = ([-10.0, -20.0], [-12.0, -18.0]);
        let (beta, alpha, eps) = (0.5, 1.5, 0.2);
        let (loss, m) = cpo_loss(beta, alpha, eps, t(&[0.75]), t(&c), t(&r));
        // Δ = 0.5·2 = 1 and 0.5·(−2) = −1.
        let pref = [1.0, -1.0]
            .iter()
            .map(|&d: &f64| -(1.0 - eps) * ls(d) - eps * ls(-d))
            .sum::<f64>()
            / 2.0;
        close(values(loss)[0], pref + alpha * 0.75, 1e-6);
        close(m.get("nll_loss").unwrap(), 0.75, 1e-7);
        close(m.get("rewards/chosen").unwrap(), 0.5 * -15.0, 1e-6);
        close(m.get("rewards/rejected").unwrap(), 0.5 * -15.0, 1e-6);
        close(m.get("rewards/accuracies").unwrap(), 0.5, 0.0);
        close(m.get("rewards/margins").unwrap(), 0.0, 1e-6);
        close(m.get("logps/rejected").unwrap(), -15.0, 1e-6);
    }

    /// With α = 0 only the preference term is left: at a tie it is log 2.
    #[test]
    fn alpha_zero_is_the_plain_sigmoid_loss() {
        let (loss, _) = cpo_loss(0.1, 0.0, 0.0, t(&[3.0]), t(&[-5.0]), t(&[-5.0]));
        close(values(loss)[0], 2f64.ln(), 1e-6);
    }
}
