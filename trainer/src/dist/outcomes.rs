//! What each rank's micro-batches produced in a step, gathered to every rank in global
//! order. The step's loss, metrics and each micro-batch's share (its weight over the
//! global total) then come out exactly as in one process holding the whole global batch,
//! which is what makes losses that normalise over the batch (DPO's means, GRPO's `dapo`
//! token count) independent of the world size.

use crate::objectives::{Combine, Metrics};

use super::{DistError, Group};

/// One micro-batch's outcome, without its graph.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub loss: f64,
    pub weight: f64,
    pub tokens: usize,
    pub metrics: Metrics,
}

/// Every rank's outcomes of a step.
#[derive(Debug, Default)]
pub struct Gathered {
    /// In global order: rank 0's, then rank 1's, …
    pub outcomes: Vec<Outcome>,
    /// Where this rank's outcomes start in `outcomes`.
    pub first_local: usize,
    /// A stop signal any rank received, so all stop after the same step.
    pub signal: Option<i32>,
    /// Step-level metrics (GRPO's rewards), combined over the ranks that had them.
    pub step_metrics: Metrics,
}

fn kind(c: Combine) -> f64 {
    match c {
        Combine::Mean => 0.0,
        Combine::Min => 1.0,
        Combine::Max => 2.0,
    }
}

/// Gathers the step. Metric names travel as this rank's own (every rank's objective names
/// the same metrics in the same order); a rank with no outcome of its own names the others'
/// metrics only if it has a step-level template, so its log line may carry fewer metrics —
/// only rank 0 logs, and it has outcomes whenever the step has any but the last, ragged one.
pub fn gather(
    group: &Group,
    local: &[Outcome],
    signal: Option<i32>,
    step_metrics: &Metrics,
) -> Result<Gathered, DistError> {
    let k = local.first().map_or(0, |o| o.metrics.0.len());
    let mut payload = vec![
        signal.map_or(-1.0, f64::from),
        local.len() as f64,
        k as f64,
        step_metrics.0.len() as f64,
    ];
    for o in local {
        payload.extend([o.loss, o.weight, o.tokens as f64]);
        payload.extend(o.metrics.0.iter().take(k).map(|m| m.1));
        payload.resize(payload.len() + k - o.metrics.0.len().min(k), 0.0);
    }
    for m in &step_metrics.0 {
        payload.extend([m.1, kind(m.2)]);
    }
    let all = group.gather(&payload, "gathering the step's losses")?;

    let template = local.first().map(|o| &o.metrics);
    let mut out = Gathered::default();
    let mut step_sums: Vec<(f64, usize)> = vec![(0.0, 0); step_metrics.0.len()];
    for (rank, p) in all.iter().enumerate() {
        let field = |i: usize| p.get(i).copied().unwrap_or(0.0);
        if field(0) >= 0.0 && out.signal.is_none() {
            out.signal = Some(field(0) as i32);
        }
        let (n, their_k, their_s) = (field(1) as usize, field(2) as usize, field(3) as usize);
        if rank == group.rank() {
            out.first_local = out.outcomes.len();
        }
        let mut at = 4;
        for _ in 0..n {
            let values: Vec<f64> = (0..their_k).map(|j| field(at + 3 + j)).collect();
            let metrics = match template {
                Some(t) => Metrics(
                    t.0.iter()
                        .zip(&values)
                        .map(|((name, _, c), v)| (name.clone(), *v, *c))
                        .collect(),
                ),
                None => Metrics::default(),
            };
            out.outcomes.push(Outcome {
                loss: field(at),
                weight: field(at + 1),
                tokens: field(at + 2) as usize,
                metrics,
            });
            at += 3 + their_k;
        }
        for (j, sum) in step_sums.iter_mut().enumerate().take(their_s) {
            let v = field(at + 2 * j);
            let c = step_metrics.0[j].2;
            sum.0 = match (c, sum.1) {
                (_, 0) => v,
                (Combine::Mean, _) => sum.0 + v,
                (Combine::Min, _) => sum.0.min(v),
                (Combine::Max, _) => sum.0.max(v),
            };
            sum.1 += 1;
        }
    }
    for ((name, _, c), (v, n)) in step_metrics.0.iter().zip(step_sums) {
        let v = if *c == Combine::Mean {
            v / n.max(1) as f64
        } else {
            v
        };
        out.step_metrics.push(name.clone(), v, *c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alone, the gather hands back exactly what went in (the single-process path relies
    /// on it to stay bit-identical).
    #[test]
    fn alone_round_trips() {
        let mut m = Metrics::default();
        m.mean("mean_token_accuracy", 0.25);
        m.push("max", 3.0, Combine::Max);
        let local = vec![
            Outcome {
                loss: 1.2345678901234567,
                weight: 17.0,
                tokens: 40,
                metrics: m.clone(),
            },
            Outcome {
                loss: 0.5,
                weight: 3.0,
                tokens: 9,
                metrics: m.clone(),
            },
        ];
        let mut step = Metrics::default();
        step.mean("reward", 0.75);
        let g = gather(&Group::alone(), &local, Some(15), &step).unwrap();
        assert_eq!(g.first_local, 0);
        assert_eq!(g.signal, Some(15));
        assert_eq!(g.outcomes.len(), 2);
        assert_eq!(g.outcomes[0].loss, 1.2345678901234567);
        assert_eq!((g.outcomes[1].weight, g.outcomes[1].tokens), (3.0, 9));
        assert_eq!(g.outcomes[1].metrics, m);
        assert_eq!(g.step_metrics, step);
        let none = gather(&Group::alone(), &[], None, &Metrics::default()).unwrap();
        assert!(none.outcomes.is_empty() && none.signal.is_none());
    }
}
