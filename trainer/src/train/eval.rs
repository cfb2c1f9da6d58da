//! Evaluation: the objective's loss over the eval set without gradients, shared out over
//! the ranks and combined in order, and its `eval_*` line.

use serde_json::json;

use super::step::{scalar, shard, shares};
use crate::Result;
use crate::dist::Group;
use crate::dist::outcomes::Outcome as StepOutcome;
use crate::examples::Micro;
use crate::objectives::{LossInput, Metrics, Objective};
use crate::run_dir::RunDir;

/// Weighted metrics and loss over `batches`, with their tokens. Each rank evaluates a
/// contiguous share of the batches; the results combine in the batches' order, as in one
/// process.
pub(super) fn evaluate(
    dp: &Group,
    objective: &dyn Objective,
    input: &LossInput,
    batches: &[Micro],
    progress: &dyn Fn(&str, usize, usize),
) -> Result<Option<(f64, Metrics, usize)>> {
    let share_len = batches.len().div_ceil(dp.world_size()).max(1);
    let mut local = Vec::new();
    let mine = shard(batches, share_len, dp.rank());
    let planned = mine.len();
    for (k, b) in mine.iter().enumerate() {
        if let Some(o) = objective.loss(input, b)? {
            local.push(StepOutcome {
                loss: scalar(o.loss),
                weight: o.weight,
                tokens: o.tokens,
                metrics: o.metrics,
            });
        }
        progress("eval batches", k + 1, planned);
    }
    let outs = crate::dist::outcomes::gather(dp, &local, None, &Metrics::default())?.outcomes;
    if outs.is_empty() {
        return Ok(None);
    }
    let (mut loss, mut metrics, mut tokens) = (0.0, Metrics::default(), 0);
    let weights: Vec<f64> = outs.iter().map(|o| o.weight).collect();
    for (o, share) in outs.iter().zip(shares(&weights)) {
        loss += o.loss * share;
        metrics.accumulate(&o.metrics, share);
        tokens += o.tokens;
    }
    Ok(Some((loss, metrics, tokens)))
}

/// One evaluation's line in `metrics.jsonl`, under TRL's `eval_` names.
pub(super) fn log_eval(
    run: &RunDir,
    objective: &dyn Objective,
    (loss, metrics, tokens): (f64, &Metrics, usize),
    step: usize,
    epoch: f64,
) -> Result<()> {
    let mut line = json!({ "eval_loss": loss, "epoch": epoch, "step": step });
    for (name, value) in objective.eval_extras(loss, tokens) {
        line[name] = value;
    }
    for (name, value, _) in &metrics.0 {
        line[format!("eval_{name}")] = json!(value);
    }
    Ok(run.log(&line)?)
}
