//! A logged line over `logging_steps` steps shows their average loss and metrics, as the
//! Trainer and TRL log them: TRL averages every stored metric over the window, a batch's
//! minimum or maximum reward included. The learning rate and gradient norm are the last
//! step's.

use std::borrow::Cow;

use checkpoints::run_state::LogWindow;

use crate::objectives::Metrics;

/// Folds one finite step into the window.
pub fn add(window: &mut LogWindow, loss: f64, metrics: &Metrics) {
    window.steps += 1;
    window.loss += loss;
    for (name, value, _) in &metrics.0 {
        match window
            .metrics
            .iter_mut()
            .find(|(n, _, _)| n == name.as_ref())
        {
            Some((_, sum, n)) => {
                *sum += value;
                *n += 1;
            }
            None => window.metrics.push((name.to_string(), *value, 1)),
        }
    }
}

/// The window's mean loss and metrics, in the order `last` (the step being logged) names
/// them, leaving the window empty.
pub fn take(window: &mut LogWindow, last: &Metrics) -> (f64, Metrics) {
    let w = std::mem::take(window);
    let loss = w.loss / w.steps.max(1) as f64;
    let mut out = Metrics::default();
    for (name, value, combine) in &last.0 {
        let v = match w.metrics.iter().find(|(n, _, _)| n == name.as_ref()) {
            Some((_, sum, n)) => sum / (*n).max(1) as f64,
            None => *value,
        };
        out.push(Cow::Owned(name.to_string()), v, *combine);
    }
    (loss, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::Combine;

    fn step(acc: f64, low: f64) -> Metrics {
        let mut m = Metrics::default();
        m.mean("rewards/accuracies", acc);
        m.push("min_reward", low, Combine::Min);
        m
    }

    #[test]
    fn a_window_averages_its_steps_and_starts_over() {
        let mut w = LogWindow::default();
        add(&mut w, 9.2155, &step(0.75, -1.0));
        add(&mut w, 9.0240, &step(0.375, -3.0));
        let (loss, m) = take(&mut w, &step(0.375, -3.0));
        assert!((loss - (9.2155 + 9.0240) / 2.0).abs() < 1e-12);
        assert_eq!(m.get("rewards/accuracies"), Some(0.5625));
        // A batch's minimum is averaged over the window, as TRL averages its stored
        // metrics, not the window's minimum.
        assert_eq!(m.get("min_reward"), Some(-2.0));
        assert_eq!(w, LogWindow::default());
        add(&mut w, 1.0, &step(1.0, 2.0));
        let (loss, m) = take(&mut w, &step(1.0, 2.0));
        assert_eq!((loss, m.get("rewards/accuracies")), (1.0, Some(1.0)));
    }
}
