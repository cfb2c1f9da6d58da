//! Every objective's gradient at its kinks, against PyTorch's subgradients (what TRL's
//! losses give there): `logsigmoid` at 0 is ½, `relu` at 0 passes nothing, `clamp` at its
//! bounds passes everything, and `min(a, b)` at a tie splits the gradient evenly, which
//! for the GRPO surrogate sums to the gradient of either side.

use burn::tensor::{Device, Tensor, TensorData};

use super::dpo::{DpoLoss, DpoLossType, PairLogps, dpo_loss};
use super::grpo::loss::{Surrogate, TokenTerms, per_token_loss};
use super::test_util::close;
use super::{log_sigmoid, log1m_exp, orpo::orpo_loss, reward::reward_loss, values};

fn device() -> Device {
    Device::flex().autodiff()
}

/// A leaf that takes gradients.
fn leaf(v: &[f64]) -> Tensor<1> {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let n = v.len();
    Tensor::<1>::from_data(TensorData::new(v, [n]), &device()).require_grad()
}

fn constant(v: &[f64]) -> Tensor<1> {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    let n = v.len();
    Tensor::<1>::from_data(TensorData::new(v, [n]), &device())
}

/// `d sum(f(x)) / dx` at the points `x`.
fn grad_of(x: &[f64], f: impl Fn(Tensor<1>) -> Tensor<1>) -> Vec<f64> {
    let x = leaf(x);
    let grads = f(x.clone()).sum().backward();
    values(x.grad(&grads).expect("x takes a gradient"))
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

#[test]
fn log_sigmoid_gradient_is_sigmoid_of_minus_x_at_zero_and_around_it() {
    let xs = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 30.0, -30.0];
    let got = grad_of(&xs, log_sigmoid);
    for (g, x) in got.iter().zip(xs) {
        close(*g, sigmoid(-x), 1e-6);
    }
    // Exactly ½ at zero, the point DPO's first step sits on.
    assert_eq!(got[0], 0.5);
    assert_eq!(got[1], 0.5);
    // The value is unchanged by writing min(x, 0) as (x − |x|)/2.
    let v = values(log_sigmoid(constant(&[0.0, -3.0, 3.0])));
    close(v[0], -std::f64::consts::LN_2, 1e-7);
    close(v[1], -3.0 - (-3.0f64).exp().ln_1p(), 1e-7);
    close(v[2], -(-3.0f64).exp().ln_1p(), 1e-7);
}

fn pairs(chosen: Tensor<1>, rejected: Tensor<1>, len: f64) -> PairLogps {
    PairLogps {
        chosen,
        rejected,
        chosen_len: constant(&[len]),
        rejected_len: constant(&[len]),
        tokens: None,
    }
}

/// `d loss / d log πθ(chosen)` and `d loss / d log πθ(rejected)` for one pair whose policy
/// log-probs are `(c, r)` against a reference `(rc, rr)`, completions of `len` tokens.
fn dpo_grads(
    kind: DpoLossType,
    beta: f64,
    eps: f64,
    (c, r): (f64, f64),
    reference: (f64, f64),
    len: f64,
) -> (f64, f64) {
    let (pc, pr) = (leaf(&[c]), leaf(&[r]));
    let policy = pairs(pc.clone(), pr.clone(), len);
    let reference = pairs(constant(&[reference.0]), constant(&[reference.1]), len);
    let (loss, _) = dpo_loss(&DpoLoss::single(kind, beta, eps), &policy, &reference);
    let grads = loss.backward();
    (
        values(pc.grad(&grads).expect("chosen"))[0],
        values(pr.grad(&grads).expect("rejected"))[0],
    )
}

#[test]
fn dpo_sigmoid_at_a_zero_margin_takes_half_the_slope() {
    // Policy = reference: Δ = 0, d(−log σ(Δ))/dΔ = −½, and dΔ/d chosen = β.
    let beta = 0.1;
    let (gc, gr) = dpo_grads(
        DpoLossType::Sigmoid,
        beta,
        0.0,
        (-12.0, -9.0),
        (-12.0, -9.0),
        4.0,
    );
    close(gc, -0.5 * beta, 1e-7);
    close(gr, 0.5 * beta, 1e-7);
    // With label smoothing ε the slope at 0 is −(1−ε)/2 + ε/2.
    let eps = 0.2;
    let (gc, _) = dpo_grads(
        DpoLossType::Sigmoid,
        beta,
        eps,
        (-12.0, -9.0),
        (-12.0, -9.0),
        4.0,
    );
    close(gc, beta * (-(1.0 - eps) * 0.5 + eps * 0.5), 1e-7);
}

#[test]
fn dpo_robust_at_a_zero_margin() {
    let (beta, eps) = (0.5, 0.1);
    let (gc, gr) = dpo_grads(
        DpoLossType::Robust,
        beta,
        eps,
        (-3.0, -2.0),
        (-3.0, -2.0),
        2.0,
    );
    // d/dΔ [−(1−ε)·log σ(Δ) + ε·log σ(−Δ)]/(1−2ε) at 0 = [−(1−ε)/2 − ε/2]/(1−2ε).
    let slope = (-(1.0 - eps) * 0.5 - eps * 0.5) / (1.0 - 2.0 * eps);
    close(gc, beta * slope, 1e-6);
    close(gr, -beta * slope, 1e-6);
}

#[test]
fn dpo_hinge_passes_nothing_at_its_kink_and_all_below_it() {
    // β = 1 and a log-ratio difference of exactly 1: Δ = 1, relu(1 − Δ) sits on its kink,
    // where PyTorch's relu passes no gradient.
    let (gc, gr) = dpo_grads(
        DpoLossType::Hinge,
        1.0,
        0.0,
        (-2.0, -3.0),
        (-2.0, -2.0),
        1.0,
    );
    assert_eq!((gc, gr), (0.0, 0.0));
    // Δ = 0.5: inside the hinge, slope −β.
    let (gc, gr) = dpo_grads(
        DpoLossType::Hinge,
        1.0,
        0.0,
        (-2.0, -2.5),
        (-2.0, -2.0),
        1.0,
    );
    assert_eq!((gc, gr), (-1.0, 1.0));
    // Δ = 2: past it, nothing.
    let (gc, _) = dpo_grads(
        DpoLossType::Hinge,
        1.0,
        0.0,
        (-1.0, -3.0),
        (-2.0, -2.0),
        1.0,
    );
    assert_eq!(gc, 0.0);
}

#[test]
fn dpo_ipo_is_smooth_with_zero_slope_at_its_target() {
    // h = (log-ratio difference)/len; IPO's loss (h − 1/(2β))² has slope 0 at h = 1/(2β).
    let beta = 0.5;
    let len = 4.0;
    let target = 1.0 / (2.0 * beta);
    let (gc, gr) = dpo_grads(
        DpoLossType::Ipo,
        beta,
        0.0,
        (-10.0 + target * len, -10.0),
        (-10.0, -10.0),
        len,
    );
    close(gc, 0.0, 1e-6);
    close(gr, 0.0, 1e-6);
    // At h = 0: slope 2(0 − 1/(2β))/len on chosen.
    let (gc, _) = dpo_grads(
        DpoLossType::Ipo,
        beta,
        0.0,
        (-10.0, -10.0),
        (-10.0, -10.0),
        len,
    );
    close(gc, 2.0 * -target / len, 1e-6);
}

#[test]
fn reward_loss_at_a_tie_takes_half_the_slope() {
    let (c, r) = (leaf(&[0.7, -1.0]), leaf(&[0.7, -1.0]));
    let (loss, _) = reward_loss(c.clone(), r.clone(), constant(&[0.0, 0.0]), 0.0);
    let grads = loss.backward();
    // −mean(log σ(c − r)) at c = r: −½ per pair, over 2 pairs.
    assert_eq!(values(c.grad(&grads).expect("c")), vec![-0.25, -0.25]);
    assert_eq!(values(r.grad(&grads).expect("r")), vec![0.25, 0.25]);
}

#[test]
fn log1m_exp_gradient_across_its_branches() {
    // d/dx log(1 − eˣ) = −eˣ/(1 − eˣ); the series branch below t = 1e-2, the direct one from
    // there on: both sides of the boundary agree with the formula.
    let xs = [-0.5, -1e-2, -0.99e-2, -1.01e-2, -1e-3, -1e-5];
    let got = grad_of(&xs, log1m_exp);
    for (g, x) in got.iter().zip(xs) {
        let want = -x.exp() / -x.exp_m1();
        close(*g, want, 1e-4);
    }
    // Above −1e-7 the value is held: no gradient (PyTorch's form would give −∞ or NaN).
    let got = grad_of(&[0.0, -1e-9], log1m_exp);
    assert_eq!(got, vec![0.0, 0.0]);
}

#[test]
fn orpo_at_equal_chosen_and_rejected_takes_half_the_odds_slope() {
    // log_odds = 0 when chosen = rejected: d(−λ·log σ(lo))/d lo = −λ/2, and
    // d lo/d c = 1 + eᶜ/(1 − eᶜ).
    let lambda = 0.1;
    let lp = -0.7f64;
    let (c, r) = (leaf(&[lp]), leaf(&[lp]));
    let (loss, _) = orpo_loss(lambda, constant(&[0.0]), c.clone(), r.clone());
    let grads = loss.backward();
    let dlo = 1.0 + lp.exp() / -lp.exp_m1();
    close(
        values(c.grad(&grads).expect("c"))[0],
        -lambda * 0.5 * dlo,
        1e-6,
    );
    close(
        values(r.grad(&grads).expect("r"))[0],
        lambda * 0.5 * dlo,
        1e-6,
    );
}

/// `d ℓ / d log πθ` of one token of the GRPO surrogate.
fn surrogate_grad(logp: f64, old: f64, advantage: f64, s: Surrogate) -> f64 {
    let x = leaf(&[logp]);
    let terms = TokenTerms {
        logp: x.clone(),
        old: constant(&[old]),
        reference: None,
        advantage: constant(&[advantage]),
    };
    let (loss, _, _, _) = per_token_loss(&terms, s);
    let grads = loss.sum().backward();
    values(x.grad(&grads).expect("logp"))[0]
}

#[test]
fn grpo_clip_at_its_bounds() {
    // ρ = 1 exactly (samples used once) with the clip's bounds at 1 on both sides: the
    // unclipped and clipped terms tie and the clamp sits on both bounds. PyTorch gives half
    // the gradient to each side of the tie and the clamp passes its bounds, so the gradient
    // is −A·ρ, as if nothing were clipped.
    let tight = Surrogate {
        epsilon_low: 0.0,
        epsilon_high: 0.0,
        beta: 0.0,
    };
    assert_eq!(surrogate_grad(-1.5, -1.5, 2.0, tight), -2.0);
    assert_eq!(surrogate_grad(-1.5, -1.5, -3.0, tight), 3.0);
    // Inside the clip range: −A·ρ.
    let s = Surrogate {
        epsilon_low: 0.2,
        epsilon_high: 0.28,
        beta: 0.0,
    };
    close(surrogate_grad(-1.0, -1.1, 1.0, s), -(0.1f64).exp(), 1e-6);
    // Past the upper bound with A > 0, or below the lower one with A < 0: nothing.
    assert_eq!(surrogate_grad(-1.0, -1.5, 1.0, s), 0.0);
    assert_eq!(surrogate_grad(-2.0, -1.0, -1.0, s), 0.0);
    // Past the upper bound with A < 0, the unclipped term is the smaller: −A·ρ.
    close(surrogate_grad(-1.0, -1.5, -1.0, s), (0.5f64).exp(), 1e-6);
    // k3 KL: d/dθ [e^{ref−θ} − (ref−θ) − 1] = 1 − e^{ref−θ}, 0 where θ = ref (its minimum).
    let x = leaf(&[-1.0]);
    let terms = TokenTerms {
        logp: x.clone(),
        old: x.clone().detach(),
        reference: Some(constant(&[-1.0])),
        advantage: constant(&[0.0]),
    };
    let (loss, _, _, _) = per_token_loss(&terms, Surrogate { beta: 0.5, ..s });
    let grads = loss.sum().backward();
    assert_eq!(values(x.grad(&grads).expect("logp"))[0], 0.0);
}
