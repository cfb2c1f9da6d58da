//! The pieces of one optimizer step that do not depend on the method: each micro-batch's
//! share, global-norm clipping, the finiteness guards, and the seeds that make a step's
//! random draws independent of what ran before and of which rank runs it.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use crate::model::Llama;

/// The sum of every value, over the last axis first, so no single reduction spans more than
/// one row or the row totals (each far below the size at which flex splits a sum across
/// threads).
fn rows_then_total<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    if D < 2 {
        return t.sum();
    }
    t.sum_dim(D - 1).sum()
}

/// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
/// before clipping. burn's own clipping works per tensor, which is not what LLM recipes mean.
pub fn clip_global_norm(model: &Llama, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SumSquares<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SumSquares<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                // Rows first: flex sums a whole tensor of 4M values or more on every
                // core, in an order that depends on the scheduling, and the norm must
                // come out bit for bit the same on every run.
                let s = rows_then_total(g.square());
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads
                    .register::<D>(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    let mut sum = SumSquares { grads, total: None };
    model.visit(&mut sum);
    let norm = sum
        .total
        .map(|t| {
            t.into_data()
                .try_into_vec_as::<f64>()
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(0.0)
                .sqrt()
        })
        .unwrap_or(0.0);
    if max_norm > 0.0 && norm > max_norm {
        let mut scale = Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        };
        model.visit(&mut scale);
    }
    norm
}

/// What makes a step's update unsafe, if anything: a NaN or infinite loss, or a finite loss
/// whose gradient holds a NaN or ∞ somewhere (one such element makes the global norm
/// non-finite, so the norm is the whole check).
pub(super) fn non_finite(loss: f64, grad_norm: f64) -> Option<&'static str> {
    if !loss.is_finite() {
        Some("loss")
    } else if !grad_norm.is_finite() {
        Some("gradient norm")
    } else {
        None
    }
}

/// Whether every parameter is finite (one reduction per tensor, read back once).
pub(super) fn all_finite(model: &Llama) -> bool {
    struct Check(Option<Tensor<1>>);
    impl ModuleVisitor for Check {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            // Any NaN or ±∞ makes the sum of |x| non-finite (overflow to ∞ only for values
            // near f32's limit, which are as good as diverged). Summed in f32 whatever the
            // weights are stored in: an f16 sum passes 65504 for any realistic matrix.
            let s = crate::model::precision::f32(param.val().detach())
                .abs()
                .sum();
            self.0 = Some(match self.0.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
    let mut c = Check(None);
    model.visit(&mut c);
    c.0.is_none_or(|t| scalar(t).is_finite())
}

/// Rank `rank`'s part of a group: its `per_rank` micro-batches, in rank order (empty for
/// ranks past a ragged last group's end).
pub(super) fn shard<T>(group: &[T], per_rank: usize, rank: usize) -> &[T] {
    let start = (rank * per_rank).min(group.len());
    let end = (start + per_rank).min(group.len());
    &group[start..end]
}

/// Each micro-batch's share of a step (or an evaluation): its weight over the total, so
/// the step's loss is `Σ wᵢ·lossᵢ / Σ wᵢ`. When every weight is zero (e.g. GRPO `dapo`
/// with every completion masked) the micro-batches share equally, and the step still
/// counts, with zero loss.
pub(super) fn shares(weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    if total > 0.0 {
        weights.iter().map(|w| w / total).collect()
    } else {
        vec![1.0 / weights.len().max(1) as f64; weights.len()]
    }
}

pub(super) fn scalar(t: Tensor<1>) -> f64 {
    crate::objectives::values(t)
        .first()
        .copied()
        .unwrap_or(f64::NAN)
}

/// Keeps the sampler's stream apart from the dropout stream of the same step.
pub(super) const SAMPLER_SEED: u64 = 0x5EED_0F5A_3B1E_D00D;

/// The device RNG is reseeded before every step from the seed and the step alone, so
/// dropout draws do not depend on what ran before — a resumed run draws the same.
pub(super) fn step_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// The seed of a step's `index`-th micro-batch (counted over every rank): its dropout
/// draws are the same whichever rank runs it, so a data-parallel run trains as one
/// process with the whole global batch.
pub(super) fn micro_seed(seed: u64, step: usize, index: usize) -> u64 {
    step_seed(seed, step) ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Keeps ranks' samplers apart (rank 0's stream is the single-process one).
pub(super) const RANK_SEED: u64 = 0xA076_1D64_78BD_642F;

#[cfg(test)]
mod optimizer_tests {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Tensor, TensorData};

    use crate::model::{NewModel, init_model, load_model};
    use crate::recipe::TrainSection;

    /// With zero gradients AdamW's only update is decoupled decay, `θ ← θ(1 − lr·wd)`: the
    /// matrices shrink, the norms (rank-1) must not move.
    #[test]
    fn weight_decay_skips_norms_and_biases() {
        struct ZeroGrads(GradientsParams);
        impl ModuleVisitor for ZeroGrads {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0
                    .register::<D>(param.id, param.val().zeros_like().inner());
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        init_model(tmp.path(), &NewModel::default(), Default::default()).unwrap();
        let device = Device::flex().autodiff();
        let (_, model) = load_model(tmp.path(), &device).unwrap();
        let t = TrainSection {
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut optim = super::super::setup::optimizer(&t, &model);
        let mut zero = ZeroGrads(GradientsParams::new());
        model.visit(&mut zero);
        let host = |t: Tensor<1>| t.into_data().try_into_vec_as::<f32>().unwrap();
        let norm_before = host(model.norm.weight.val());
        let q_before = model.layers[0].self_attn.q_proj.dense_weight();
        let model = optim.step(0.1, model, zero.0);
        assert_eq!(host(model.norm.weight.val()), norm_before);
        let q_after = model.layers[0].self_attn.q_proj.dense_weight();
        let want = q_before.mul_scalar(1.0 - 0.1 * 0.5);
        let worst = (q_after - want)
            .abs()
            .max()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()[0];
        assert!(worst < 1e-7, "decayed matrices off by {worst}");
    }

    /// Weights stored in f16 whose magnitudes add up past f16's 65504 are finite: the check
    /// sums in f32 (an f16 sum called every realistic fp16 model diverged, failing healthy
    /// runs at their first skipped step and refusing their checkpoints).
    #[test]
    fn f16_weights_are_summed_in_f32() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = NewModel {
            init_std: 25.0,
            ..Default::default()
        };
        init_model(tmp.path(), &spec, Default::default()).unwrap();
        let (_, model) = load_model(tmp.path(), &Device::flex()).unwrap();
        let half = crate::model::with_precision(
            model,
            crate::model::precision::Precision::from_flags(false, true),
        );
        let q = half.layers[0].self_attn.q_proj.dense_weight();
        let total: f32 = crate::model::precision::f32(q.clone())
            .abs()
            .sum()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()[0];
        assert!(
            total > 65504.0,
            "the test needs a sum past f16's range: {total}"
        );
        assert!(super::all_finite(&half));
    }

    /// A single NaN in one gradient, with a finite loss, makes the global norm NaN, and the
    /// step is judged unsafe because of the gradient; clipping does not hide it.
    #[test]
    fn one_nan_gradient_element_marks_the_step_bad() {
        struct Grads(GradientsParams, bool);
        impl ModuleVisitor for Grads {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let mut g = param.val().ones_like().inner();
                if !self.1 {
                    // The first tensor gets a NaN in its first element only.
                    let mut v = vec![1f32; g.shape().num_elements()];
                    v[0] = f32::NAN;
                    g = Tensor::<D>::from_data(TensorData::new(v, g.dims()), &g.device());
                    self.1 = true;
                }
                self.0.register::<D>(param.id, g);
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        init_model(tmp.path(), &NewModel::default(), Default::default()).unwrap();
        let device = Device::flex().autodiff();
        let (_, model) = load_model(tmp.path(), &device).unwrap();
        let mut grads = Grads(GradientsParams::new(), false);
        model.visit(&mut grads);
        let norm = super::clip_global_norm(&model, &mut grads.0, 1.0);
        assert!(norm.is_nan(), "norm {norm}");
        assert_eq!(super::non_finite(0.7, norm), Some("gradient norm"));
        assert_eq!(super::non_finite(f64::INFINITY, norm), Some("loss"));
        assert_eq!(super::non_finite(0.7, 3.0), None);
        // Without the NaN the same gradients pass.
        let mut clean = Grads(GradientsParams::new(), true);
        model.visit(&mut clean);
        let norm = super::clip_global_norm(&model, &mut clean.0, 1.0);
        assert_eq!(super::non_finite(0.7, norm), None);
    }
}
