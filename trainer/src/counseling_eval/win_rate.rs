//! Win rate of one model's replies over another's, each reply scored on its own by a
//! reward model (so the order the two are shown in cannot matter), with a percentile
//! bootstrap 95% interval over prompts.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// What the win-rate section reports.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WinRate {
    pub prompts: usize,
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// `(wins + ties / 2) / prompts`.
    pub win_rate: f64,
    /// Percentile bootstrap interval: the 2.5th and 97.5th percentiles of the win rate over
    /// `bootstrap_samples` resamplings of the prompts, with replacement.
    pub ci95: [f64; 2],
    pub bootstrap_samples: usize,
    pub seed: u64,
    pub mean_score: f64,
    pub mean_score_against: f64,
}

/// Each prompt's outcome for the model: 1 (its reply scored higher), ½ (equal) or 0.
fn outcomes(model: &[f64], against: &[f64]) -> Vec<f64> {
    model
        .iter()
        .zip(against)
        .map(|(a, b)| match a.partial_cmp(b) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Equal) => 0.5,
            _ => 0.0,
        })
        .collect()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The `q`-quantile of sorted `v`, interpolating linearly between ranks (numpy's default).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The win rate of `model`'s scores over `against`'s (same prompts, same order), with its
/// bootstrap interval from `samples` resamplings seeded by `seed`.
pub fn win_rate(model: &[f64], against: &[f64], samples: usize, seed: u64) -> WinRate {
    let o = outcomes(model, against);
    let n = o.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut rates: Vec<f64> = (0..samples.max(1))
        .map(|_| (0..n).map(|_| o[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    rates.sort_by(f64::total_cmp);
    WinRate {
        prompts: n,
        wins: o.iter().filter(|&&x| x == 1.0).count(),
        ties: o.iter().filter(|&&x| x == 0.5).count(),
        losses: o.iter().filter(|&&x| x == 0.0).count(),
        win_rate: mean(&o),
        ci95: [quantile(&rates, 0.025), quantile(&rates, 0.975)],
        bootstrap_samples: samples.max(1),
        seed,
        mean_score: mean(model),
        mean_score_against: mean(against),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_ties_as_half_and_is_reproducible_in_its_seed() {
        let w = win_rate(&[2.0, 1.0, 0.0, 5.0], &[1.0, 1.0, 3.0, 4.0], 500, 7);
        assert_eq!((w.wins, w.ties, w.losses), (2, 1, 1));
        assert_eq!(w.win_rate, 2.5 / 4.0);
        assert_eq!(w.mean_score, 2.0);
        assert_eq!(
            w,
            win_rate(&[2.0, 1.0, 0.0, 5.0], &[1.0, 1.0, 3.0, 4.0], 500, 7)
        );
        assert!(w.ci95[0] <= w.win_rate && w.win_rate <= w.ci95[1]);
        // Every resampled rate is a multiple of 1/8 between 0 and 1.
        for b in w.ci95 {
            assert!((0.0..=1.0).contains(&b));
        }
    }

    #[test]
    fn a_model_that_always_wins_or_ties_has_a_degenerate_interval() {
        let w = win_rate(&[1.0; 30], &[0.0; 30], 200, 0);
        assert_eq!((w.win_rate, w.ci95), (1.0, [1.0, 1.0]));
        let t = win_rate(&[3.0; 30], &[3.0; 30], 200, 0);
        assert_eq!((t.win_rate, t.ci95), (0.5, [0.5, 0.5]));
    }

    #[test]
    fn the_interval_matches_the_binomial_normal_approximation() {
        // 240 wins of 400: p = 0.6, and the bootstrap interval of a mean of Bernoulli
        // outcomes approaches p ± 1.96·sqrt(p(1−p)/n) = 0.6 ± 0.048.
        let model: Vec<f64> = (0..400).map(|i| f64::from(u8::from(i % 5 < 3))).collect();
        let against = vec![0.5; 400];
        let w = win_rate(&model, &against, 4000, 3);
        assert_eq!(w.win_rate, 0.6);
        let half = 1.96 * (0.6f64 * 0.4 / 400.0).sqrt();
        for (got, want) in w.ci95.iter().zip([0.6 - half, 0.6 + half]) {
            assert!((got - want).abs() < 0.006, "{:?} vs ±{half}", w.ci95);
        }
    }

    #[test]
    fn quantiles_interpolate_between_ranks() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 0.0);
        assert_eq!(quantile(&v, 0.5), 2.0);
        assert_eq!(quantile(&v, 0.625), 2.5);
        assert_eq!(quantile(&v, 1.0), 4.0);
    }
}
