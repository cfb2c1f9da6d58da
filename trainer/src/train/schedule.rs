//! The learning-rate schedule and the run's length in steps.

use crate::choices::LrScheduler;

/// The multiplier on the peak learning rate at optimizer step `step` (0-based), as
/// transformers' schedulers compute it: linear warmup from 0, then constant, linear decay
/// to 0, or half a cosine to 0.
pub fn lr_factor(kind: LrScheduler, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        LrScheduler::Linear => (1.0 - progress).max(0.0),
        LrScheduler::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
        LrScheduler::Constant => 1.0,
    }
}

/// Optimizer steps of the run and of its warmup: `max_steps`, or every epoch's steps
/// (`num_train_epochs` of them, a fraction rounded up);
/// `warmup_steps`, or `warmup_ratio` of them rounded up.
pub(super) fn total_and_warmup(
    t: &crate::recipe::TrainSection,
    steps_per_epoch: usize,
) -> (usize, usize) {
    let total = if t.max_steps > 0 {
        t.max_steps
    } else {
        // A fraction of an epoch is its share of the steps, rounded up (at least one).
        ((t.num_train_epochs * steps_per_epoch as f64).ceil() as usize).max(1)
    };
    let warmup = if t.warmup_steps > 0 {
        t.warmup_steps
    } else {
        (t.warmup_ratio * total as f64).ceil() as usize
    };
    (total, warmup)
}

#[cfg(test)]
mod tests {
    use super::{lr_factor, total_and_warmup};
    use crate::choices::LrScheduler;

    /// A fraction of an epoch runs its share of the steps rounded up, as transformers
    /// counts `num_train_epochs = 0.5`; `max_steps` wins over epochs.
    #[test]
    fn fractional_epochs_round_their_steps_up() {
        let mut t = crate::recipe::TrainSection {
            max_steps: 0,
            ..Default::default()
        };
        for (epochs, per_epoch, want) in [(0.5, 5, 3), (1.0, 5, 5), (2.5, 4, 10), (0.01, 5, 1)] {
            t.num_train_epochs = epochs;
            assert_eq!(
                total_and_warmup(&t, per_epoch).0,
                want,
                "{epochs} × {per_epoch}"
            );
        }
        t.max_steps = 7;
        assert_eq!(total_and_warmup(&t, 5).0, 7);
    }

    #[test]
    fn schedules_follow_transformers() {
        // Warmup 2 of 10: 0, 0.5, then the decay.
        assert_eq!(lr_factor(LrScheduler::Linear, 0, 2, 10), 0.0);
        assert_eq!(lr_factor(LrScheduler::Linear, 1, 2, 10), 0.5);
        assert_eq!(lr_factor(LrScheduler::Linear, 2, 2, 10), 1.0);
        assert_eq!(lr_factor(LrScheduler::Linear, 6, 2, 10), 0.5);
        assert_eq!(lr_factor(LrScheduler::Linear, 10, 2, 10), 0.0);
        assert!((lr_factor(LrScheduler::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!(
            (lr_factor(LrScheduler::Cosine, 4, 2, 10)
                - (0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())))
            .abs()
                < 1e-12
        );
        assert_eq!(lr_factor(LrScheduler::Constant, 9, 2, 10), 1.0);
        assert_eq!(lr_factor(LrScheduler::Constant, 0, 0, 10), 1.0);
    }
}
