//! Training objectives: one file per method behind the [`Objective`] trait, which the one
//! loop in [`crate::train`] drives; [`registry`] maps `train.method` to them. The losses
//! take sequence log-probs (or scores) as tensors, so each reads like its formula and is
//! tested on fixed values.

pub mod cpo;
pub mod dpo;
pub mod dpo_losses;
pub mod grpo;
#[cfg(test)]
mod kinks;
pub mod objective;
pub mod orpo;
pub mod pairs;
pub mod reference;
pub mod registry;
pub mod reward;
pub mod sequences;
pub mod sft;
pub mod simpo;

pub use objective::{LossInput, MicroOutput, Objective, Prepare, StepInput, StepLosses};
pub use reference::Reference;

use std::borrow::Cow;

use burn::tensor::{Int, Tensor};

/// How a metric combines across micro-batches and evaluation batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Weighted by each batch's share (tokens or pairs).
    Mean,
    Min,
    Max,
}

/// Whether a recipe's coefficient survives the trip into f32 tensors: a finite f64 beyond
/// f32's range (`beta = 1e39`) becomes infinite there, and every step's loss with it.
pub fn fits_f32(x: f64) -> bool {
    x.is_finite() && x.abs() <= f64::from(f32::MAX)
}

/// Named metrics of one batch, under TRL's names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics(pub Vec<(Cow<'static, str>, f64, Combine)>);

impl Metrics {
    pub fn mean(&mut self, name: impl Into<Cow<'static, str>>, value: f64) {
        self.0.push((name.into(), value, Combine::Mean));
    }

    pub fn push(&mut self, name: impl Into<Cow<'static, str>>, value: f64, combine: Combine) {
        self.0.push((name.into(), value, combine));
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|m| m.0 == name).map(|m| m.1)
    }

    /// Folds `other`, weighted `share`, into `self` (empty `self` takes `other`'s names).
    pub fn accumulate(&mut self, other: &Metrics, share: f64) {
        if self.0.is_empty() {
            self.0 = other
                .0
                .iter()
                .map(|(n, v, c)| {
                    let v = if *c == Combine::Mean { v * share } else { *v };
                    (n.clone(), v, *c)
                })
                .collect();
            return;
        }
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            mine.1 = match mine.2 {
                Combine::Mean => mine.1 + theirs.1 * share,
                Combine::Min => mine.1.min(theirs.1),
                Combine::Max => mine.1.max(theirs.1),
            };
        }
    }
}

/// TRL's preference metrics from per-pair implicit rewards and the log-probs behind them:
/// `rewards/{chosen,rejected,accuracies,margins}` and `logps/{chosen,rejected}`.
pub fn preference_metrics(
    chosen_rewards: &[f64],
    rejected_rewards: &[f64],
    logps_chosen: Tensor<1>,
    logps_rejected: Tensor<1>,
) -> Metrics {
    let pairs = || chosen_rewards.iter().zip(rejected_rewards);
    let wins: Vec<f64> = pairs().map(|(c, r)| f64::from(u8::from(c > r))).collect();
    let margins: Vec<f64> = pairs().map(|(c, r)| c - r).collect();
    let mut m = Metrics::default();
    m.mean("rewards/chosen", mean(chosen_rewards));
    m.mean("rewards/rejected", mean(rejected_rewards));
    m.mean("rewards/accuracies", mean(&wins));
    m.mean("rewards/margins", mean(&margins));
    m.mean("logps/chosen", mean(&values(logps_chosen.detach())));
    m.mean("logps/rejected", mean(&values(logps_rejected.detach())));
    m
}

/// [`preference_metrics`] for rewards that are the policy's log-probs times `scale`
/// (reference-free methods: ORPO, SimPO, CPO).
pub fn scaled_preference_metrics(scale: f64, chosen: Tensor<1>, rejected: Tensor<1>) -> Metrics {
    let chosen_rewards = values(chosen.clone().detach().mul_scalar(scale));
    let rejected_rewards = values(rejected.clone().detach().mul_scalar(scale));
    preference_metrics(&chosen_rewards, &rejected_rewards, chosen, rejected)
}

/// The label-smoothed sigmoid loss of a preference margin `Δ`, per pair:
/// `−(1−ε)·log σ(Δ) − ε·log σ(−Δ)` (DPO's `sigmoid`, SimPO, CPO).
pub fn smoothed_sigmoid_loss(delta: Tensor<1>, eps: f64) -> Tensor<1> {
    log_sigmoid(delta.clone()).mul_scalar(-(1.0 - eps)) - log_sigmoid(delta.neg()).mul_scalar(eps)
}

/// `log σ(x) = min(x, 0) − log(1 + e^{−|x|})`: finite for every finite `x`, where the
/// textbook `−log(1 + e^{−x})` overflows for large negative `x`.
///
/// `min(x, 0)` is written `(x − |x|)/2`, which has the same value bit for bit, because its
/// gradient must be right at `x = 0`: there `clamp_max` passes 1 and `|x|` passes 0, so
/// the textbook form's derivative comes out 1 instead of σ(−0) = ½. DPO meets exactly
/// that point on its first step, when policy and reference agree and every margin is 0.
/// The halves here give ½ − ½·sign(x) + sign(x)·σ(−|x|), which is σ(−x) everywhere, as
/// PyTorch's `logsigmoid` backward is.
pub fn log_sigmoid(x: Tensor<1>) -> Tensor<1> {
    let abs = x.clone().abs();
    (x - abs.clone()).mul_scalar(0.5) - abs.neg().exp().log1p()
}

/// `log(1 − e^{x})` for log-probabilities `x ≤ 0`. Near 0 the difference `1 − e^{x}`
/// cancels, so there it uses the series `t − t²/2 + t³/6 − t⁴/24` (`t = −x`); `x` is kept
/// at most `−1e-7` so a probability of one gives a large finite value, never `−∞`.
///
/// Its kinks: at the series boundary `t = 1e-2` the direct branch is taken, and both
/// branches' derivatives agree there to 1e-9 relative, so the gradient is continuous. Above
/// `x = −1e-7` the value is held and the gradient is 0, where PyTorch's unguarded
/// `log1p(−exp(x))` gives `−∞` or NaN; a completion that certain carries no signal either
/// way, and a NaN would end the run.
pub fn log1m_exp(x: Tensor<1>) -> Tensor<1> {
    let t = x.neg().clamp_min(1e-7);
    let small = t.clone().clamp_max(1e-2);
    let series = small.clone()
        * (small.clone().mul_scalar(-0.5).add_scalar(1.0)
            + small.clone().powi_scalar(2).div_scalar(6.0)
            - small.powi_scalar(3).div_scalar(24.0));
    let direct = t.clone().neg().exp().neg().add_scalar(1.0);
    let near = t.lower_elem(1e-2);
    direct.mask_where(near, series).log()
}

/// What an objective reads from the model at the loss positions of a batch.
pub(crate) struct TargetLogprobs {
    /// `[N]` log-prob of each target.
    pub logprobs: Tensor<1>,
    /// `[N]` 1 where the target was the head's top token.
    pub hits: Tensor<1, Int>,
    /// `[N]` the entropy of each row's distribution (no gradient), from the same pass.
    pub entropy: Tensor<1>,
    /// `[N, hidden]` the final hidden states read, and the head applied to them (for
    /// further per-token quantities such as entropy without rebuilding the head).
    pub rows: Tensor<2>,
    pub head: kernels::Head,
}

/// The log-prob of each target at the flat positions `rows` (into `[B·T]`) of a batch,
/// through the chunked head. Every objective reads the model this way, so none holds
/// `[tokens × vocab]` logits.
///
/// At a `temperature` other than 0 (greedy sampling) and 1, of `log_softmax(z / T)`, as TRL's
/// GRPO scores its completions (policy, old and reference alike). The head is linear in the
/// hidden state (no bias; LoRA's path too), so dividing the rows the head reads divides every
/// logit, and `rows` and `head` describe the tempered distribution for entropy as well.
pub(crate) fn target_logprobs(
    model: &crate::model::Llama,
    ids: Tensor<2, Int>,
    positions: Tensor<2, Int>,
    segments: Tensor<2, Int>,
    rows: Tensor<1, Int>,
    targets: Tensor<1, Int>,
    temperature: f64,
) -> TargetLogprobs {
    let hidden = model.hidden_packed(ids, positions, segments);
    logprobs_of_hidden(model, hidden, rows, targets, temperature)
}

/// [`target_logprobs`] from the final hidden states `[B, T, hidden]` already computed,
/// for a caller that reads them for more than the targets.
pub(crate) fn logprobs_of_hidden(
    model: &crate::model::Llama,
    hidden: Tensor<3>,
    rows: Tensor<1, Int>,
    targets: Tensor<1, Int>,
    temperature: f64,
) -> TargetLogprobs {
    let [b, t, h] = hidden.dims();
    let rows = hidden.reshape([b * t, h]).select(0, rows);
    let rows = if temperature > 0.0 && temperature != 1.0 {
        rows.div_scalar(temperature)
    } else {
        rows
    };
    let head = model.head(&rows);
    let read = kernels::token_logprobs(rows.clone(), &head, targets, sft::LOGPROB_CHUNK);
    TargetLogprobs {
        logprobs: read.logprobs,
        hits: read.hits,
        entropy: read.entropy,
        rows,
        head,
    }
}

/// [`target_logprobs`] at an [`LmBatch`](crate::batch::LmBatch)'s loss positions.
pub(crate) fn lm_logprobs(
    model: &crate::model::Llama,
    batch: &crate::batch::LmBatch,
) -> TargetLogprobs {
    lm_logprobs_tempered(model, batch, 1.0)
}

/// [`target_logprobs`] at an [`LmBatch`](crate::batch::LmBatch)'s loss positions, at
/// `temperature`.
pub(crate) fn lm_logprobs_tempered(
    model: &crate::model::Llama,
    batch: &crate::batch::LmBatch,
    temperature: f64,
) -> TargetLogprobs {
    target_logprobs(
        model,
        batch.ids.clone(),
        batch.positions.clone(),
        batch.segments.clone(),
        batch.loss_rows.clone(),
        batch.targets.clone(),
        temperature,
    )
}

/// Host copies of a small tensor's values (metrics only; never on the gradient path).
pub(crate) fn values(t: Tensor<1>) -> Vec<f64> {
    t.into_data().try_into_vec_as::<f64>().unwrap_or_default()
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use burn::tensor::{Device, Tensor, TensorData};

    /// Pairs' summed log-probs `c`, `r` over completions of `cl`, `rl` tokens.
    pub fn logps(c: &[f64], r: &[f64], cl: &[f64], rl: &[f64]) -> super::pairs::PairLogps {
        super::pairs::PairLogps {
            chosen: t(c),
            rejected: t(r),
            chosen_len: t(cl),
            rejected_len: t(rl),
            tokens: None,
        }
    }

    pub fn t(v: &[f64]) -> Tensor<1> {
        let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &Device::flex())
    }

    pub fn close(a: f64, b: f64, tol: f64) {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{a} is not within {tol} of {b}"
        );
    }

    /// `log σ(x)` in f64, the plain way where it is exact enough.
    pub fn ls(x: f64) -> f64 {
        if x >= 0.0 {
            -(-x).exp().ln_1p()
        } else {
            x - x.exp().ln_1p()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    /// `log_softmax(z / T)[target]` from the model's full logits, for every loss position.
    #[test]
    fn tempered_logprobs_are_the_log_softmax_of_logits_over_the_temperature() {
        use crate::model::{NewModel, init_model, load_model};
        use burn::tensor::Device;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        init_model(&dir, &NewModel::default(), Default::default()).unwrap();
        let device = Device::flex();
        let (config, model) = load_model(&dir, &device).unwrap();
        let seq = data::tokenize::Sequence {
            ids: vec![5, 9, 17, 3, 44, 8, 120],
            loss_mask: vec![0, 0, 1, 1, 1, 1, 1],
        };
        let batch = crate::batch::LmBatch::new(&data::batch::Batch::padded(&[&seq], 0), &device);
        let logits: Vec<f32> = model
            .logits(model.hidden_packed(
                batch.ids.clone(),
                batch.positions.clone(),
                batch.segments.clone(),
            ))
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let ints = |t: Tensor<1, Int>| t.into_data().try_into_vec_as::<i64>().unwrap();
        let (rows, targets) = (ints(batch.loss_rows.clone()), ints(batch.targets.clone()));
        let v = config.vocab_size;
        for temperature in [1.0, 0.7, 2.5, 0.0] {
            let got = values(lm_logprobs_tempered(&model, &batch, temperature).logprobs);
            let scale = if temperature > 0.0 { temperature } else { 1.0 };
            for ((&row, &target), got) in rows.iter().zip(&targets).zip(&got) {
                let z: Vec<f64> = logits[row as usize * v..(row as usize + 1) * v]
                    .iter()
                    .map(|&x| x as f64 / scale)
                    .collect();
                let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                close(*got, z[target as usize] - lse, 1e-5);
            }
        }
    }

    #[test]
    fn log_sigmoid_is_finite_at_the_extremes() {
        let got = values(log_sigmoid(t(&[-1e4, -30.0, -1.0, 0.0, 2.0, 1e4])));
        for (g, x) in got.iter().zip([-1e4, -30.0, -1.0, 0.0, 2.0, 1e4]) {
            assert!(g.is_finite());
            close(*g, ls(x), 1e-6);
        }
    }

    #[test]
    fn log1m_exp_matches_f64_and_stays_finite() {
        for x in [-1e4, -20.0, -0.7, -0.01, -1e-3, -1e-5] {
            let got = values(log1m_exp(t(&[x])))[0];
            close(got, (-(x.exp_m1())).ln(), 1e-5);
        }
        let at_zero = values(log1m_exp(t(&[0.0])))[0];
        assert!(at_zero.is_finite() && at_zero < -15.0);
    }
}
