//! The per-row halves of the head's log-probs on flex in f32, a row per task over the
//! threads: [`rows`] is the contract of `LogprobOps::logit_rows`, [`grads`] of
//! `LogprobOps::logit_grads`. The chunk's matmuls stay flex's (already threaded).

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use burn::tensor::DType;
use rayon::prelude::*;

use super::{f32_contiguous, tensor};

/// Rows per task: a row of a large vocabulary is enough work on its own, but short rows
/// are batched so the task count stays sane.
fn rows_per_task(v: usize) -> usize {
    (16_384 / v.max(1)).max(1)
}

/// Each row's target as an index, or `None` for an index dtype the twin must take.
fn target_indices(targets: &FlexTensor) -> Option<Vec<usize>> {
    let t = if targets.is_contiguous() && targets.layout().start_offset() == 0 {
        targets.clone()
    } else {
        targets.to_contiguous()
    };
    // An out-of-range or negative target is the caller's error; the twin would panic in
    // its gather, so this does too rather than read another row's value.
    let index = |i: i64| usize::try_from(i).expect("log-probs: negative target index");
    match t.dtype() {
        DType::I64 => Some(t.storage::<i64>().iter().map(|&i| index(i)).collect()),
        DType::I32 => Some(
            t.storage::<i32>()
                .iter()
                .map(|&i| index(i.into()))
                .collect(),
        ),
        _ => None,
    }
}

/// Per row of `logits` `[len, V]`: `(log p(target), log Σ exp, 1.0 where the target is
/// the first maximum, entropy)`, each `[len]`; `None` when the twin must run.
pub(crate) fn rows(
    logits: &FlexTensor,
    targets: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor, FlexTensor, FlexTensor)> {
    let logits = f32_contiguous(logits)?;
    let targets = target_indices(targets)?;
    let [len, v] = logits.shape().dims::<2>();
    let x: &[f32] = logits.storage();
    let mut out = vec![[0f32; 4]; len];
    let per = rows_per_task(v);
    out.par_chunks_mut(per).enumerate().for_each(|(task, dst)| {
        for (j, slot) in dst.iter_mut().enumerate() {
            let r = task * per + j;
            let row = &x[r * v..(r + 1) * v];
            let target = target_at(&targets, r, v);
            let (top, max) = first_max(row);
            // In f64, as the other row sums of `cpu/` (see `rows::inv_rms`).
            let mut moments = Moments::default();
            for &l in row {
                let d = l - max;
                moments.add(d.exp(), d);
            }
            let lse = (moments.sum.ln() + f64::from(max)) as f32;
            *slot = [
                row[target] - lse,
                lse,
                if top == target { 1.0 } else { 0.0 },
                moments.entropy(),
            ];
        }
    });
    let column = |c: usize| tensor(out.iter().map(|r| r[c]).collect(), [len]);
    Some((column(0), column(1), column(2), column(3)))
}

/// `g·(onehot(t) − exp(logits − lse))` per row, `[len, V]`; `None` when the twin must run.
pub(crate) fn grads(
    logits: &FlexTensor,
    targets: &FlexTensor,
    lse: &FlexTensor,
    grad: &FlexTensor,
) -> Option<FlexTensor> {
    let logits = f32_contiguous(logits)?;
    let (lse, grad) = (f32_contiguous(lse)?, f32_contiguous(grad)?);
    let targets = target_indices(targets)?;
    let [len, v] = logits.shape().dims::<2>();
    let (x, lse, g): (&[f32], &[f32], &[f32]) = (logits.storage(), lse.storage(), grad.storage());
    let mut out = vec![0f32; len * v];
    out.par_chunks_mut(v.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let row = &x[r * v..(r + 1) * v];
            for (d, &l) in dst.iter_mut().zip(row) {
                *d = -((l - lse[r]).exp() * g[r]);
            }
            dst[target_at(&targets, r, v)] += g[r];
        });
    Some(tensor(out, [len, v]))
}

/// [`rows`], and each row's slope `onehot(t) − p` written over its logits: the log-prob's
/// own gradient in the logits ([`grads`] at `g = 1`), which a frozen head turns into the
/// hidden rows' gradient in the forward. Each `exp(l − max)` of the row sum is kept and
/// scaled by `1/Σ`, so a row takes one exponential per logit, not two, and the chunk
/// needs no second `[len, V]` buffer. `Err` hands the logits back when the twin must run.
#[allow(clippy::type_complexity)]
pub(crate) fn rows_and_slopes(
    logits: FlexTensor,
    targets: &FlexTensor,
) -> Result<(FlexTensor, FlexTensor, FlexTensor, FlexTensor, FlexTensor), FlexTensor> {
    if logits.dtype() != DType::F32 {
        return Err(logits);
    }
    let Some(targets) = target_indices(targets) else {
        return Err(logits);
    };
    let mut logits = if logits.is_contiguous() && logits.layout().start_offset() == 0 {
        logits
    } else {
        logits.to_contiguous()
    };
    let [len, v] = logits.shape().dims::<2>();
    let mut out = vec![[0f32; 4]; len];
    // Copies only where the logits are shared; the chunk's own product never is.
    let x: &mut [f32] = logits.storage_mut();
    let per = rows_per_task(v);
    x.par_chunks_mut((per * v).max(1))
        .zip(out.par_chunks_mut(per))
        .enumerate()
        .for_each(|(task, (block, dst))| {
            for (j, (row, slot)) in block.chunks_mut(v.max(1)).zip(dst).enumerate() {
                *slot = slope_row(row, target_at(&targets, task * per + j, v));
            }
        });
    let column = |c: usize| tensor(out.iter().map(|r| r[c]).collect(), [len]);
    Ok((column(0), column(1), column(2), column(3), logits))
}

/// One row of [`rows_and_slopes`]: `(log p(target), log Σ exp, hit, entropy)`, the row
/// overwritten with `onehot(target) − p`.
fn slope_row(row: &mut [f32], target: usize) -> [f32; 4] {
    let (top, max) = first_max(row);
    let picked = row[target];
    // The sums in f64, as [`rows`]: the same log-sum-exp and entropy to the bit.
    let mut moments = Moments::default();
    for l in row.iter_mut() {
        let d = *l - max;
        *l = d.exp();
        moments.add(*l, d);
    }
    let lse = (moments.sum.ln() + f64::from(max)) as f32;
    let inv = (1.0 / moments.sum) as f32;
    for e in row.iter_mut() {
        *e = -(*e * inv);
    }
    row[target] += 1.0;
    [
        picked - lse,
        lse,
        if top == target { 1.0 } else { 0.0 },
        moments.entropy(),
    ]
}

/// A row's `Σ e^d` and `Σ e^d·d` over its shifted logits `d = l − max`: with them the
/// entropy `−Σ p log p = log Σe^d − Σ e^d·d / Σ e^d` comes from the pass that finds the
/// log-sum-exp, for one multiply-add per logit and no second exponential.
#[derive(Default)]
struct Moments {
    sum: f64,
    weighted: f64,
}

impl Moments {
    fn add(&mut self, e: f32, d: f32) {
        self.sum += f64::from(e);
        self.weighted += f64::from(e) * f64::from(d);
    }

    fn entropy(&self) -> f32 {
        (self.sum.ln() - self.weighted / self.sum) as f32
    }
}

/// Row `r`'s target, checked against the vocabulary: an out-of-range target is the
/// caller's error, and the twin would panic in its gather, so this does too rather than
/// read another row's value.
fn target_at(targets: &[usize], r: usize, v: usize) -> usize {
    let target = targets[r];
    assert!(
        target < v,
        "log-probs: target {target} outside a vocabulary of {v}"
    );
    target
}

/// The row's first maximum and its index, as `argmax` picks it.
fn first_max(row: &[f32]) -> (usize, f32) {
    let (mut top, mut max) = (0, f32::NEG_INFINITY);
    for (i, &l) in row.iter().enumerate() {
        if i == 0 || l > max {
            top = i;
            max = l;
        }
    }
    (top, max)
}
