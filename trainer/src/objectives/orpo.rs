//! Odds-Ratio Preference Optimization, without a reference model. On length-averaged
//! completion log-probs `lp`:
//! `log_odds = (lp_c − lp_r) − (log(1 − e^{lp_c}) − log(1 − e^{lp_r}))`,
//! `loss = NLL(chosen) − λ·mean(log σ(log_odds))`.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::fits_f32;
use super::objective::{LossInput, MicroOutput, Objective};
use super::pairs::Pairs;
use super::sequences::LogitsOver;
use super::{Metrics, log_sigmoid, log1m_exp, mean, scaled_preference_metrics, values};
use crate::Result;
use crate::examples::{Micro, Shape};
use crate::recipe::Recipe;

/// `[orpo]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrpoSection {
    /// λ, the weight of the odds-ratio term (TRL's `beta`).
    pub lambda: f64,
    /// Restrict the NLL term to completion tokens; by default it covers the whole chosen
    /// sequence, prompt included, as TRL and the ORPO paper's code do.
    pub nll_completion_only: bool,
}

impl Default for OrpoSection {
    fn default() -> Self {
        Self {
            lambda: 0.1,
            nll_completion_only: false,
        }
    }
}

/// ORPO with its settings.
pub struct Orpo(OrpoSection);

/// The registry's constructor: the `[orpo]` section (or its defaults), checked.
pub fn build(recipe: &Recipe) -> std::result::Result<Box<dyn Objective>, String> {
    let o = recipe.orpo.clone().unwrap_or_default();
    if !(o.lambda >= 0.0 && fits_f32(o.lambda)) {
        return Err(format!(
            "orpo.lambda {} must be non-negative (and within f32)",
            crate::recipe::shown(o.lambda)
        ));
    }
    Ok(Box::new(Orpo(o)))
}

impl Objective for Orpo {
    fn name(&self) -> &'static str {
        "orpo"
    }

    fn shape(&self) -> Shape {
        Shape::Pairs
    }

    fn summary_keys(&self) -> &'static [&'static str] {
        &["rewards/accuracies"]
    }

    fn loss(&self, input: &LossInput, micro: &Micro) -> Result<Option<MicroOutput>> {
        let Some(pairs) = Pairs::gather(input, micro, self.name())? else {
            return Ok(None);
        };
        // TRL's ORPO averages the logits over every position but the last.
        let (policy, all) = pairs.policy_with_stats(input, LogitsOver::AllButLastPosition);
        let nll = pairs.chosen_nll(&policy, all, self.0.nll_completion_only);
        let (avg_chosen, avg_rejected) = policy.length_averaged();
        let (loss, mut m) = orpo_loss(self.0.lambda, nll, avg_chosen, avg_rejected);
        if let Some(t) = policy.tokens {
            t.log(&mut m);
        }
        Ok(Some(pairs.output((loss, m))))
    }
}

/// `nll`: the chosen sequences' token-mean cross-entropy (a scalar); `avg_chosen`,
/// `avg_rejected`: `[N]` length-averaged log-probs.
pub fn orpo_loss(
    lambda: f64,
    nll: Tensor<1>,
    avg_chosen: Tensor<1>,
    avg_rejected: Tensor<1>,
) -> (Tensor<1>, Metrics) {
    let log_odds = (avg_chosen.clone() - avg_rejected.clone())
        - (log1m_exp(avg_chosen.clone()) - log1m_exp(avg_rejected.clone()));
    let ratio = log_sigmoid(log_odds.clone());
    let loss = nll.clone() - ratio.clone().mean().mul_scalar(lambda);

    let mut m = scaled_preference_metrics(lambda, avg_chosen, avg_rejected);
    m.mean("nll_loss", values(nll.detach())[0]);
    m.mean("log_odds_ratio", mean(&values(ratio.detach())));
    m.mean("log_odds_chosen", mean(&values(log_odds.detach())));
    (loss, m)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, ls, t};
    use super::*;

    fn log_odds(c: f64, r: f64) -> f64 {
        (c - r) - ((-c.exp_m1()).ln() - (-r.exp_m1()).ln())
    }

    #[test]
    fn loss_and_metrics_match_the_formula() {
        let (c, r) = ([-0.4, -1.2], [-0.9, -0.3]);
        let lambda = 0.2;
        let (loss, m) = orpo_loss(lambda, t(&[1.5]), t(&c), t(&r));
        let lo = [log_odds(c[0], r[0]), log_odds(c[1], r[1])];
        let ratio = (ls(lo[0]) + ls(lo[1])) / 2.0;
        close(values(loss)[0], 1.5 - lambda * ratio, 1e-6);
        close(m.get("nll_loss").unwrap(), 1.5, 1e-7);
        close(m.get("log_odds_ratio").unwrap(), ratio, 1e-6);
        close(
            m.get("log_odds_chosen").unwrap(),
            (lo[0] + lo[1]) / 2.0,
            1e-6,
        );
        close(m.get("rewards/accuracies").unwrap(), 0.5, 0.0);
        close(m.get("rewards/chosen").unwrap(), lambda * -0.8, 1e-6);
    }

    #[test]
    fn extreme_log_probs_stay_finite() {
        // A certain chosen completion (lp = 0) against an impossible rejected one.
        let (loss, m) = orpo_loss(0.1, t(&[0.0]), t(&[0.0, -1e4]), t(&[-1e4, -1e-9]));
        assert!(values(loss)[0].is_finite());
        assert!(m.0.iter().all(|x| x.1.is_finite()), "{m:?}");
        // The first pair strongly favours chosen: its log σ is ≈ 0.
        let (loss, _) = orpo_loss(1.0, t(&[0.0]), t(&[-1e-3]), t(&[-50.0]));
        close(values(loss)[0], -ls(log_odds(-1e-3, -50.0)), 1e-4);
    }
}
