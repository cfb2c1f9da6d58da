//! DPO's loss types, TRL's set, each over one micro-batch's pairs. With the log-ratios
//! `c = log πθ(y_c) − log πref(y_c)` and `r = log πθ(y_r) − log πref(y_r)`, `h = c − r`,
//! `Δ = β·h` and ε the label smoothing:
//! - `sigmoid`: `−(1−ε)·log σ(Δ) − ε·log σ(−Δ)` (ε: hearth keeps cDPO's smoothing, which
//!   TRL dropped; at ε = 0, TRL's loss);
//! - `ipo`: `(h̄ − 1/(2β))²`, `h̄` the same difference on length-averaged log-ratios;
//! - `hinge`: `relu(1 − Δ)`;
//! - `robust`: `[−(1−ε)·log σ(Δ) + ε·log σ(−Δ)] / (1 − 2ε)`;
//! - `exo_pair`: `σ(Δ)·(log σ(Δ) − log(1−ε)) + σ(−Δ)·(log σ(−Δ) − log ε)`;
//! - `nca_pair`: `−log σ(βc) − ½·log σ(−βc) − ½·log σ(−βr)`;
//! - `bco_pair`: `−log σ(βc) − log σ(−βr)`;
//! - `sppo_hard`: `(c − 1/(2β))² + (r + 1/(2β))²`;
//! - `aot`: the sigmoid loss on `β·(sort(lp_c − lp_r) − sort(ref_c − ref_r))`, sorted over
//!   the micro-batch; `aot_unpaired` on `β·(sort(c) − sort(r))`;
//! - `apo_zero`: `1 − σ(βc) + σ(βr)`; `apo_down`: `σ(βc) + 1 − σ(Δ)`;
//! - `discopop`: `−log σ(Δ)·(1 − σ(Δ/τ)) + e^{−Δ}·σ(Δ/τ)`;
//! - `sft`: the chosen completions' token-mean NLL;
//! - `sigmoid_norm`: `−log σ(β·h̄)`.
//!
//! Several types add up with weights (`loss_type = ["sigmoid", "bco_pair", "sft"]`,
//! `loss_weights = [0.8, 0.2, 1.0]`: MPO), each term the mean over the pairs.

use std::str::FromStr;

use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{Int, Tensor, TensorData};

use super::pairs::PairLogps;
use super::{log_sigmoid, smoothed_sigmoid_loss, values};

/// One of TRL's DPO loss types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpoLossType {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    ExoPair,
    NcaPair,
    BcoPair,
    SppoHard,
    Aot,
    AotUnpaired,
    ApoZero,
    ApoDown,
    Discopop,
    Sft,
    SigmoidNorm,
}

const NAMES: [(&str, DpoLossType); 15] = [
    ("sigmoid", DpoLossType::Sigmoid),
    ("ipo", DpoLossType::Ipo),
    ("hinge", DpoLossType::Hinge),
    ("robust", DpoLossType::Robust),
    ("exo_pair", DpoLossType::ExoPair),
    ("nca_pair", DpoLossType::NcaPair),
    ("bco_pair", DpoLossType::BcoPair),
    ("sppo_hard", DpoLossType::SppoHard),
    ("aot", DpoLossType::Aot),
    ("aot_unpaired", DpoLossType::AotUnpaired),
    ("apo_zero", DpoLossType::ApoZero),
    ("apo_down", DpoLossType::ApoDown),
    ("discopop", DpoLossType::Discopop),
    ("sft", DpoLossType::Sft),
    ("sigmoid_norm", DpoLossType::SigmoidNorm),
];

impl FromStr for DpoLossType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|&(_, t)| t)
            .ok_or_else(|| {
                let known: Vec<&str> = NAMES.iter().map(|(n, _)| *n).collect();
                format!("unknown DPO loss_type `{s}` ({})", known.join(", "))
            })
    }
}

impl DpoLossType {
    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("?", |(n, _)| n)
    }

    /// Whether the loss reads the label smoothing ε.
    pub fn reads_label_smoothing(self) -> bool {
        matches!(
            self,
            Self::Sigmoid | Self::Robust | Self::ExoPair | Self::Aot | Self::AotUnpaired
        )
    }
}

/// The loss of a DPO run: its weighted types and their settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoLoss {
    pub terms: Vec<(DpoLossType, f64)>,
    pub beta: f64,
    pub label_smoothing: f64,
    /// DiscoPOP's τ.
    pub discopop_tau: f64,
}

impl DpoLoss {
    /// One loss type, weight 1.
    pub fn single(kind: DpoLossType, beta: f64, label_smoothing: f64) -> Self {
        Self {
            terms: vec![(kind, 1.0)],
            beta,
            label_smoothing,
            discopop_tau: 0.05,
        }
    }

    /// `Σ_k w_k · mean over pairs of loss_k`, a `[1]` tensor.
    pub fn loss(&self, policy: &PairLogps, reference: &PairLogps) -> Tensor<1> {
        let mut total: Option<Tensor<1>> = None;
        for &(kind, weight) in &self.terms {
            let term = self
                .per_pair(kind, policy, reference)
                .mean()
                .mul_scalar(weight);
            total = Some(match total {
                Some(t) => t + term,
                None => term,
            });
        }
        total.unwrap_or_else(|| Tensor::zeros([1], &policy.chosen.device()))
    }

    /// `[N]`: the loss of each pair under `kind`.
    fn per_pair(&self, kind: DpoLossType, policy: &PairLogps, reference: &PairLogps) -> Tensor<1> {
        let (beta, eps) = (self.beta, self.label_smoothing);
        let c = policy.chosen.clone() - reference.chosen.clone().detach();
        let r = policy.rejected.clone() - reference.rejected.clone().detach();
        let h = c.clone() - r.clone();
        let delta = h.clone().mul_scalar(beta);
        // The log-ratios per completion token: TRL counts at least one.
        let averaged = || {
            let per_token = |x: Tensor<1>, len: &Tensor<1>| x / len.clone().clamp_min(1.0);
            per_token(c.clone(), &policy.chosen_len) - per_token(r.clone(), &policy.rejected_len)
        };
        match kind {
            DpoLossType::Sigmoid => smoothed_sigmoid_loss(delta, eps),
            DpoLossType::Ipo => averaged().sub_scalar(1.0 / (2.0 * beta)).powi_scalar(2),
            // `relu`, not `clamp_min(0)`: at `Δ = 1` PyTorch's relu (which TRL uses) passes
            // no gradient, where a clamp passes all of it.
            DpoLossType::Hinge => relu(delta.neg().add_scalar(1.0)),
            DpoLossType::Robust => (log_sigmoid(delta.clone()).mul_scalar(-(1.0 - eps))
                + log_sigmoid(delta.neg()).mul_scalar(eps))
            .div_scalar(1.0 - 2.0 * eps),
            DpoLossType::ExoPair => {
                let win =
                    sigmoid(delta.clone()) * log_sigmoid(delta.clone()).sub_scalar((-eps).ln_1p());
                let lose =
                    sigmoid(delta.clone().neg()) * log_sigmoid(delta.neg()).sub_scalar(eps.ln());
                win + lose
            }
            DpoLossType::NcaPair => {
                let (bc, br) = (c.mul_scalar(beta), r.mul_scalar(beta));
                log_sigmoid(bc.clone()).neg()
                    - log_sigmoid(bc.neg()).mul_scalar(0.5)
                    - log_sigmoid(br.neg()).mul_scalar(0.5)
            }
            DpoLossType::BcoPair => {
                log_sigmoid(c.mul_scalar(beta)).neg() - log_sigmoid(r.mul_scalar(beta).neg())
            }
            DpoLossType::SppoHard => {
                let half = 0.5 / beta;
                c.sub_scalar(half).powi_scalar(2) + r.add_scalar(half).powi_scalar(2)
            }
            DpoLossType::Aot => {
                let policy_gap = policy.chosen.clone() - policy.rejected.clone();
                let reference_gap =
                    (reference.chosen.clone() - reference.rejected.clone()).detach();
                let d = sorted(policy_gap) - sorted(reference_gap);
                smoothed_sigmoid_loss(d.mul_scalar(beta), eps)
            }
            DpoLossType::AotUnpaired => {
                smoothed_sigmoid_loss((sorted(c) - sorted(r)).mul_scalar(beta), eps)
            }
            DpoLossType::ApoZero => {
                sigmoid(c.mul_scalar(beta)).neg().add_scalar(1.0) + sigmoid(r.mul_scalar(beta))
            }
            DpoLossType::ApoDown => {
                sigmoid(c.mul_scalar(beta)) + sigmoid(delta).neg().add_scalar(1.0)
            }
            DpoLossType::Discopop => {
                let scaled = delta.clone().div_scalar(self.discopop_tau);
                let logistic = log_sigmoid(delta.clone()).neg();
                // `e^{−Δ}·σ(Δ/τ)` as one exponential: where Δ is very negative, `e^{−Δ}`
                // overflows while σ(Δ/τ) underflows, and their product (TRL's form) is
                // NaN; the sum of their logs stays finite.
                let exponential = (delta.neg() + log_sigmoid(scaled.clone())).exp();
                logistic * sigmoid(scaled).neg().add_scalar(1.0) + exponential
            }
            DpoLossType::Sft => {
                let n = policy.chosen.dims()[0];
                let nll = policy.chosen.clone().sum().neg() / policy.chosen_len.clone().sum();
                nll.expand([n])
            }
            DpoLossType::SigmoidNorm => log_sigmoid(averaged().mul_scalar(beta)).neg(),
        }
    }
}

/// `x` in ascending order, as `torch.sort` gives it, with the gradient going back to each
/// value's own position (a gather by the order read on the host: the batch is small).
fn sorted(x: Tensor<1>) -> Tensor<1> {
    let v = values(x.clone().detach());
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let idx: Vec<i64> = order.into_iter().map(|i| i as i64).collect();
    let n = idx.len();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &x.device());
    x.select(0, idx)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{close, logps, ls};
    use super::*;
    use burn::tensor::Device;

    /// Three pairs; their log-ratios (policy − reference) are c = (1, −0.5, 2) and
    /// r = (−1, 0.25, 3), over completions of (4, 5, 2) and (2, 3, 6) tokens.
    const C: [f64; 3] = [1.0, -0.5, 2.0];
    const R: [f64; 3] = [-1.0, 0.25, 3.0];
    const CL: [f64; 3] = [4.0, 5.0, 2.0];
    const RL: [f64; 3] = [2.0, 3.0, 6.0];
    const REF_C: [f64; 3] = [-11.0, -20.0, -7.0];
    const REF_R: [f64; 3] = [-11.0, -9.0, -4.0];

    fn case() -> (PairLogps, PairLogps) {
        let add =
            |a: &[f64; 3], b: &[f64; 3]| -> Vec<f64> { (0..3).map(|i| a[i] + b[i]).collect() };
        (
            logps(&add(&REF_C, &C), &add(&REF_R, &R), &CL, &RL),
            logps(&REF_C, &REF_R, &CL, &RL),
        )
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    fn mean(f: impl Fn(usize) -> f64) -> f64 {
        (0..3).map(f).sum::<f64>() / 3.0
    }

    fn loss_of(kind: DpoLossType, beta: f64, eps: f64) -> f64 {
        let (p, r) = case();
        let loss = DpoLoss {
            discopop_tau: 0.5,
            ..DpoLoss::single(kind, beta, eps)
        };
        values(loss.loss(&p, &r))[0]
    }

    /// Every loss type against its formula in f64, at β 0.7 and ε 0.1.
    #[test]
    fn every_loss_type_matches_its_formula() {
        let (b, e) = (0.7, 0.1);
        let d = |i: usize| b * (C[i] - R[i]);
        let avg = |i: usize| C[i] / CL[i] - R[i] / RL[i];
        // Sorted over the batch: policy gaps lp_c − lp_r and reference gaps apart.
        let mut gap: Vec<f64> = (0..3)
            .map(|i| (REF_C[i] + C[i]) - (REF_R[i] + R[i]))
            .collect();
        let mut ref_gap: Vec<f64> = (0..3).map(|i| REF_C[i] - REF_R[i]).collect();
        let (mut sc, mut sr) = (C.to_vec(), R.to_vec());
        for v in [&mut gap, &mut ref_gap, &mut sc, &mut sr] {
            v.sort_by(f64::total_cmp);
        }
        let smoothed = |x: f64| -(1.0 - e) * ls(x) - e * ls(-x);
        let nll = -(C.iter().zip(&REF_C).map(|(c, r)| c + r).sum::<f64>()) / CL.iter().sum::<f64>();
        let cases: [(DpoLossType, f64); 15] = [
            (DpoLossType::Sigmoid, mean(|i| smoothed(d(i)))),
            (
                DpoLossType::Ipo,
                mean(|i| (avg(i) - 1.0 / (2.0 * b)).powi(2)),
            ),
            (DpoLossType::Hinge, mean(|i| (1.0 - d(i)).max(0.0))),
            (
                DpoLossType::Robust,
                mean(|i| (-(1.0 - e) * ls(d(i)) + e * ls(-d(i))) / (1.0 - 2.0 * e)),
            ),
            (
                DpoLossType::ExoPair,
                mean(|i| {
                    sig(d(i)) * (ls(d(i)) - (1.0 - e).ln()) + sig(-d(i)) * (ls(-d(i)) - e.ln())
                }),
            ),
            (
                DpoLossType::NcaPair,
                mean(|i| -ls(b * C[i]) - 0.5 * ls(-b * C[i]) - 0.5 * ls(-b * R[i])),
            ),
            (
                DpoLossType::BcoPair,
                mean(|i| -ls(b * C[i]) - ls(-b * R[i])),
            ),
            (
                DpoLossType::SppoHard,
                mean(|i| (C[i] - 0.5 / b).powi(2) + (R[i] + 0.5 / b).powi(2)),
            ),
            (
                DpoLossType::Aot,
                mean(|i| smoothed(b * (gap[i] - ref_gap[i]))),
            ),
            (
                DpoLossType::AotUnpaired,
                mean(|i| smoothed(b * (sc[i] - sr[i]))),
            ),
            (
                DpoLossType::ApoZero,
                mean(|i| 1.0 - sig(b * C[i]) + sig(b * R[i])),
            ),
            (
                DpoLossType::ApoDown,
                mean(|i| sig(b * C[i]) + 1.0 - sig(d(i))),
            ),
            (
                DpoLossType::Discopop,
                mean(|i| {
                    let m = sig(d(i) / 0.5);
                    -ls(d(i)) * (1.0 - m) + (-d(i)).exp() * m
                }),
            ),
            (DpoLossType::Sft, nll),
            (DpoLossType::SigmoidNorm, mean(|i| -ls(b * avg(i)))),
        ];
        for (kind, want) in cases {
            close(loss_of(kind, b, e), want, 2e-6);
            assert_eq!(kind.name().parse::<DpoLossType>(), Ok(kind));
        }
    }

    /// Weighted types add up: MPO's `[sigmoid, bco_pair, sft]` with `[0.8, 0.2, 1.0]`.
    #[test]
    fn weighted_types_add_up() {
        let (p, r) = case();
        let loss = DpoLoss {
            terms: vec![
                (DpoLossType::Sigmoid, 0.8),
                (DpoLossType::BcoPair, 0.2),
                (DpoLossType::Sft, 1.0),
            ],
            ..DpoLoss::single(DpoLossType::Sigmoid, 0.3, 0.0)
        };
        let want = 0.8 * loss_of(DpoLossType::Sigmoid, 0.3, 0.0)
            + 0.2 * loss_of(DpoLossType::BcoPair, 0.3, 0.0)
            + loss_of(DpoLossType::Sft, 0.3, 0.0);
        close(values(loss.loss(&p, &r))[0], want, 1e-6);
    }

    /// AOT's sort hands each sorted value's gradient back to the pair it came from: with
    /// the chosen log-ratios in reverse order, the pair holding the smallest gets the
    /// slope of the first sorted position.
    #[test]
    fn sorting_keeps_each_gradient_with_its_pair() {
        let device = Device::flex().autodiff();
        let leaf = |v: &[f32]| {
            Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device).require_grad()
        };
        let chosen = leaf(&[3.0, 1.0, 2.0]);
        let rejected = leaf(&[0.0, 0.0, 0.0]);
        let zeros = || Tensor::<1>::zeros([3], &device);
        let ones = || Tensor::<1>::ones([3], &device);
        let policy = PairLogps {
            chosen: chosen.clone(),
            rejected: rejected.clone(),
            chosen_len: ones(),
            rejected_len: ones(),
            tokens: None,
        };
        let reference = PairLogps {
            chosen: zeros(),
            rejected: zeros(),
            chosen_len: ones(),
            rejected_len: ones(),
            tokens: None,
        };
        let beta = 1.0;
        let loss = DpoLoss::single(DpoLossType::AotUnpaired, beta, 0.0).loss(&policy, &reference);
        let grads = loss.backward();
        let g = values(chosen.grad(&grads).unwrap());
        // sort(c) = (1, 2, 3) against sort(r) = 0: d/dc_k of mean(−log σ(β·c_k)) is
        // −β·σ(−β·c_k)/3 at each pair's own value.
        for (k, c) in [3.0f64, 1.0, 2.0].into_iter().enumerate() {
            close(g[k], -beta * sig(-beta * c) / 3.0, 1e-6);
        }
    }
}
