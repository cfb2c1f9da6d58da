//! The Bradley–Terry reward model: `−log σ(r_c − r_r − margin) + c·mean((r_c + r_r)²)`,
//! the second term (centering, coefficient `c`) keeping scores near zero.

use burn::tensor::Tensor;

use super::{Combine, Metrics, log_sigmoid, mean, values};

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
