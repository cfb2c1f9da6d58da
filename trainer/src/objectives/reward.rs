//! The Bradley–Terry reward model: `−log σ(r_c − r_r − margin) + c·mean((r_c + r_r)²)`,
//! the second term (centering, coefficient `c`) keeping scores near zero.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::fits_f32;
use super::objective::{LossInput, MicroOutput, Objective};
use super::pairs::Pairs;
use super::sequences::{halves, reward_scores};
use super::{Combine, Metrics, log_sigmoid, mean, values};
use crate::examples::{Micro, Shape};
use crate::recipe::Recipe;
use crate::{Result, TrainerError};

/// `[reward]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardSection {
    /// c in `c·mean((r_c + r_r)²)`; 0 turns centering off.
    pub center_rewards_coefficient: f64,
    /// A numeric column subtracted inside the Bradley–Terry term: `σ(r_c − r_r − margin)`.
    pub margin_column: Option<String>,
}

/// The reward model's objective with its settings.
pub struct Reward(RewardSection);

/// The registry's constructor: the `[reward]` section (or its defaults).
pub fn build(recipe: &Recipe) -> std::result::Result<Box<dyn Objective>, String> {
    let section = recipe.reward.clone().unwrap_or_default();
    let c = section.center_rewards_coefficient;
    if !(c >= 0.0 && fits_f32(c)) {
        return Err(format!(
            "reward.center_rewards_coefficient {c} must be ≥ 0 (0 turns centring off)"
        ));
    }
    Ok(Box::new(Reward(section)))
}

impl Objective for Reward {
    fn name(&self) -> &'static str {
        "reward"
    }

    fn shape(&self) -> Shape {
        Shape::Pairs
    }

    fn needs_score_head(&self) -> bool {
        true
    }

    fn margin_column(&self) -> Option<&str> {
        self.0.margin_column.as_deref()
    }

    fn summary_keys(&self) -> &'static [&'static str] {
        &["accuracy", "margin"]
    }

    fn loss(&self, input: &LossInput, micro: &Micro) -> Result<Option<MicroOutput>> {
        let Some(pairs) = Pairs::gather(input, micro, self.name())? else {
            return Ok(None);
        };
        let scores = reward_scores(input.model, &pairs.batch).ok_or_else(|| {
            TrainerError::Input("internal: reward training without a score head".into())
        })?;
        let (c, r) = halves(scores, pairs.batch.pairs);
        Ok(Some(pairs.output(reward_loss(
            c,
            r,
            pairs.batch.margin.clone(),
            self.0.center_rewards_coefficient,
        ))))
    }
}

/// `chosen`, `rejected`: `[N]` scores; `margin`: `[N]` (zeros without a margin column).
pub fn reward_loss(
    chosen: Tensor<1>,
    rejected: Tensor<1>,
    margin: Tensor<1>,
    center_coefficient: f64,
) -> (Tensor<1>, Metrics) {
    let diff = chosen.clone() - rejected.clone();
    let mut loss = log_sigmoid(diff.clone() - margin).neg().mean();
    if center_coefficient > 0.0 {
        let center = (chosen.clone() + rejected.clone()).powi_scalar(2).mean();
        loss = loss + center.mul_scalar(center_coefficient);
    }
    let diff = values(diff.detach());
    let mut all = values(chosen.detach());
    all.extend(values(rejected.detach()));
    let mut m = Metrics::default();
    let wins: Vec<f64> = diff.iter().map(|d| f64::from(u8::from(*d > 0.0))).collect();
    m.mean("accuracy", mean(&wins));
    m.mean("margin", mean(&diff));
    m.mean("mean_reward", mean(&all));
    m.push(
        "min_reward",
        all.iter().copied().fold(f64::INFINITY, f64::min),
        Combine::Min,
    );
    m.push(
        "max_reward",
        all.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Combine::Max,
    );
    (loss, m)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, ls, t};
    use super::*;

    #[test]
    fn loss_and_metrics_match_the_formula() {
        let (c, r, mg) = ([1.0, -0.5, 2.0], [0.5, 0.5, -1.0], [0.0, 0.25, 1.0]);
        let coef = 0.01;
        let (loss, m) = reward_loss(t(&c), t(&r), t(&mg), coef);
        let bt: f64 = (0..3).map(|i| -ls(c[i] - r[i] - mg[i])).sum::<f64>() / 3.0;
        let center: f64 = (0..3).map(|i| (c[i] + r[i]).powi(2)).sum::<f64>() / 3.0;
        close(values(loss)[0], bt + coef * center, 1e-6);
        close(m.get("accuracy").unwrap(), 2.0 / 3.0, 1e-9);
        close(m.get("margin").unwrap(), (0.5 - 1.0 + 3.0) / 3.0, 1e-6);
        close(m.get("mean_reward").unwrap(), 2.5 / 6.0, 1e-6);
        close(m.get("min_reward").unwrap(), -1.0, 0.0);
        close(m.get("max_reward").unwrap(), 2.0, 0.0);
    }

    #[test]
    fn extreme_scores_stay_finite() {
        let (loss, m) = reward_loss(t(&[-1e4, 1e4]), t(&[1e4, -1e4]), t(&[0.0, 0.0]), 0.0);
        close(values(loss)[0], (2e4 + 0.0) / 2.0, 1e-5);
        assert!(m.0.iter().all(|x| x.1.is_finite()));
    }
}
