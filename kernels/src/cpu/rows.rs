//! RMSNorm, SwiGLU and RoPE on flex in f32, forward and backward, each one pass over its
//! rows spread over the threads (the twin makes a tensor of every intermediate, on one
//! core). Each returns `None` for inputs the twin must take (another dtype).

use burn::backend::TensorMetadata;
use burn::backend::flex::FlexTensor;
use rayon::prelude::*;

use super::{f32_contiguous, tensor};

/// Values per task, so that small tensors are not cut into tasks that cost more to hand
/// out than to compute.
const TASK: usize = 1 << 14;

/// Rows of `cols` values per task.
fn rows_per_task(cols: usize) -> usize {
    (TASK / cols.max(1)).max(1)
}

/// Fills `out` (rows of `cols`) a task of rows at a time; `f(row, dst)` writes one row.
fn par_rows(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if cols == 0 {
        return;
    }
    let per = rows_per_task(cols);
    out.par_chunks_mut(per * cols)
        .enumerate()
        .for_each(|(task, dst)| {
            for (j, row) in dst.chunks_mut(cols).enumerate() {
                f(task * per + j, row);
            }
        });
}

/// `1/√(mean(x²) + eps)` of one row. Sums here run in f64: a plain f32 running sum
/// over a row drifts further from the exact value than the references' vectorised ones.
fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let sq: f64 = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    1.0 / ((sq / row.len() as f64) as f32 + eps).sqrt()
}

/// RMSNorm `(x·r)·w`: `x` `[N, C]`, `weight` `[C]`.
pub(crate) fn rms_norm(x: &FlexTensor, weight: &FlexTensor, eps: f32) -> Option<FlexTensor> {
    let (x, weight) = (f32_contiguous(x)?, f32_contiguous(weight)?);
    let [n, c] = x.shape().dims::<2>();
    let (xs, w): (&[f32], &[f32]) = (x.storage(), weight.storage());
    let mut out = vec![0f32; n * c];
    par_rows(&mut out, c, |r, dst| {
        let row = &xs[r * c..(r + 1) * c];
        let inv = inv_rms(row, eps);
        for ((d, &x), &w) in dst.iter_mut().zip(row).zip(w) {
            *d = (x * inv) * w;
        }
    });
    Some(tensor(out, [n, c]))
}

/// RMSNorm's `(dx, dw per row)`: `dx = r·w·g − (r³/C)·x·Σ(g·w·x)`, `dw_row = g·x·r`.
pub(crate) fn rms_norm_backward(
    x: &FlexTensor,
    weight: &FlexTensor,
    grad: &FlexTensor,
    eps: f32,
) -> Option<(FlexTensor, FlexTensor)> {
    let (x, weight, grad) = (
        f32_contiguous(x)?,
        f32_contiguous(weight)?,
        f32_contiguous(grad)?,
    );
    let [n, c] = x.shape().dims::<2>();
    let (xs, w, g): (&[f32], &[f32], &[f32]) = (x.storage(), weight.storage(), grad.storage());
    let (mut dx, mut dw) = (vec![0f32; n * c], vec![0f32; n * c]);
    if c > 0 {
        let per = rows_per_task(c);
        dx.par_chunks_mut(per * c)
            .zip(dw.par_chunks_mut(per * c))
            .enumerate()
            .for_each(|(task, (dx, dw))| {
                for (j, (dx, dw)) in dx.chunks_mut(c).zip(dw.chunks_mut(c)).enumerate() {
                    let r = task * per + j;
                    let (row, gr) = (&xs[r * c..(r + 1) * c], &g[r * c..(r + 1) * c]);
                    let inv = inv_rms(row, eps);
                    let dot = gr
                        .iter()
                        .zip(w)
                        .zip(row)
                        .map(|((g, w), x)| f64::from(g * w) * f64::from(*x))
                        .sum::<f64>() as f32;
                    let coef = inv * inv * inv * dot / c as f32;
                    for i in 0..c {
                        dx[i] = gr[i] * w[i] * inv - row[i] * coef;
                        dw[i] = gr[i] * row[i] * inv;
                    }
                }
            });
    }
    Some((tensor(dx, [n, c]), tensor(dw, [n, c])))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `silu(gate)·up`, elementwise over `[N, C]`.
pub(crate) fn swiglu(gate: &FlexTensor, up: &FlexTensor) -> Option<FlexTensor> {
    let (gate, up) = (f32_contiguous(gate)?, f32_contiguous(up)?);
    let shape = gate.shape();
    let (gs, us): (&[f32], &[f32]) = (gate.storage(), up.storage());
    let mut out = vec![0f32; gs.len()];
    par_rows(&mut out, TASK, |task, dst| {
        let at = task * TASK;
        for (i, d) in dst.iter_mut().enumerate() {
            let x = gs[at + i];
            *d = x * sigmoid(x) * us[at + i];
        }
    });
    Some(tensor(out, shape))
}

/// SwiGLU's `(d_gate, d_up)`: `g·up·s·(1 + gate·(1 − s))` and `g·gate·s`, `s = σ(gate)`.
pub(crate) fn swiglu_backward(
    gate: &FlexTensor,
    up: &FlexTensor,
    grad: &FlexTensor,
) -> Option<(FlexTensor, FlexTensor)> {
    let (gate, up, grad) = (
        f32_contiguous(gate)?,
        f32_contiguous(up)?,
        f32_contiguous(grad)?,
    );
    let shape = gate.shape();
    let (gs, us, g): (&[f32], &[f32], &[f32]) = (gate.storage(), up.storage(), grad.storage());
    let n = gs.len();
    let mut d_gate = vec![0f32; n];
    let mut d_up = vec![0f32; n];
    d_gate
        .par_chunks_mut(TASK)
        .zip(d_up.par_chunks_mut(TASK))
        .enumerate()
        .for_each(|(task, (dg, du))| {
            let at = task * TASK;
            for i in 0..dg.len() {
                let (x, u, gr) = (gs[at + i], us[at + i], g[at + i]);
                let s = sigmoid(x);
                let silu = x * s;
                dg[i] = gr * u * (s * (x - silu + 1.0));
                du[i] = gr * silu;
            }
        });
    Some((tensor(d_gate, shape.clone()), tensor(d_up, shape)))
}

/// RoPE, "rotate half" layout: `x·cos + rotate_half(x)·sin`, or with `transpose` its
/// gradient `g·cos + rotate_halfᵀ(g·sin)`. `x`: `[B, H, T, D]`; tables `[B, T, D]`.
pub(crate) fn rotary(
    x: &FlexTensor,
    cos: &FlexTensor,
    sin: &FlexTensor,
    transpose: bool,
) -> Option<FlexTensor> {
    let (x, cos, sin) = (
        f32_contiguous(x)?,
        f32_contiguous(cos)?,
        f32_contiguous(sin)?,
    );
    let [b, h, t, d] = x.shape().dims::<4>();
    if d % 2 != 0 || cos.shape().dims::<3>() != [b, t, d] || sin.shape().dims::<3>() != [b, t, d] {
        return None;
    }
    let (xs, cs, ss): (&[f32], &[f32], &[f32]) = (x.storage(), cos.storage(), sin.storage());
    let half = d / 2;
    let mut out = vec![0f32; xs.len()];
    par_rows(&mut out, d, |r, dst| {
        // Row r is (bi, head, ti); the tables are indexed by (bi, ti).
        let (bi, ti) = (r / (h * t), r % t);
        let row = &xs[r * d..(r + 1) * d];
        let (c, s) = (&cs[(bi * t + ti) * d..][..d], &ss[(bi * t + ti) * d..][..d]);
        for i in 0..half {
            let (x1, x2) = (row[i], row[i + half]);
            if transpose {
                // rotate_halfᵀ([y₁, y₂]) = [y₂, −y₁] with y = g·sin
                dst[i] = x1 * c[i] + x2 * s[i + half];
                dst[i + half] = x2 * c[i + half] + -(x1 * s[i]);
            } else {
                dst[i] = x1 * c[i] + -x2 * s[i];
                dst[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    });
    Some(tensor(out, [b, h, t, d]))
}
