//! Summing the trainable parameters' gradients across ranks, in buckets of about
//! `dist.bucket_mb`, so one huge full-fine-tuning gradient never needs a second full-size
//! host copy and the engine gets calls of a size it moves efficiently.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use super::{DistError, Group};
use crate::model::Llama;

/// A trainable parameter: its id, shape, and whether this rank has a gradient for it.
struct Slot {
    id: ParamId,
    dims: Vec<usize>,
    present: bool,
}

/// Replaces each rank's gradients by their sum over ranks. A parameter that no rank has a
/// gradient for stays absent, as it would in one process, so the optimizer skips it there
/// too (no decay, no moment update).
/// `device` is the (non-autodiff) device the gradients live on.
pub fn all_reduce(
    group: &Group,
    model: &Llama,
    grads: &mut GradientsParams,
    device: &Device,
) -> Result<(), DistError> {
    if group.world_size() == 1 {
        return Ok(());
    }
    struct Trainable<'a> {
        grads: &'a GradientsParams,
        slots: Vec<Slot>,
    }
    impl ModuleVisitor for Trainable<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.is_require_grad() {
                self.slots.push(Slot {
                    id: param.id,
                    dims: param.lazy_shape().dims::<D>().to_vec(),
                    present: self.grads.get::<D>(param.id).is_some(),
                });
            }
        }
    }
    let mut t = Trainable {
        grads,
        slots: Vec::new(),
    };
    model.visit(&mut t);
    let slots = t.slots;

    // Which parameters have a gradient on some rank: one count per parameter.
    let mut present: Vec<f32> = slots
        .iter()
        .map(|s| f32::from(u8::from(s.present)))
        .collect();
    group.all_reduce_sum(&mut present, "all-reduce of gradient presence")?;

    let floats_per_bucket = (group.bucket_bytes / 4).max(1);
    let mut start = 0;
    while start < slots.len() {
        // A bucket: parameters in visit order until it is full (at least one).
        let mut end = start;
        let mut len = 0;
        while end < slots.len() {
            let n: usize = slots[end].dims.iter().product();
            if end > start && len + n > floats_per_bucket {
                break;
            }
            len += n;
            end += 1;
        }
        let mut buf = Vec::with_capacity(len);
        for s in &slots[start..end] {
            let n: usize = s.dims.iter().product();
            match take(grads, s) {
                Some(v) => buf.extend(v),
                None => buf.resize(buf.len() + n, 0.0),
            }
        }
        group.all_reduce_sum(&mut buf, "all-reduce of gradients")?;
        let mut at = 0;
        for (s, &count) in slots[start..end].iter().zip(&present[start..end]) {
            let n: usize = s.dims.iter().product();
            if count > 0.0 {
                put(grads, s, buf[at..at + n].to_vec(), device);
            }
            at += n;
        }
        start = end;
    }
    Ok(())
}

/// Removes this rank's gradient for `s` and returns its values.
fn take(grads: &mut GradientsParams, s: &Slot) -> Option<Vec<f32>> {
    fn host<const D: usize>(g: Option<Tensor<D>>) -> Option<Vec<f32>> {
        g.and_then(|t| t.into_data().try_into_vec_as::<f32>().ok())
    }
    match s.dims.len() {
        1 => host(grads.remove::<1>(s.id)),
        2 => host(grads.remove::<2>(s.id)),
        3 => host(grads.remove::<3>(s.id)),
        _ => host(grads.remove::<4>(s.id)),
    }
}

fn put(grads: &mut GradientsParams, s: &Slot, values: Vec<f32>, device: &Device) {
    let data = TensorData::new(values, s.dims.clone());
    match s.dims.len() {
        1 => grads.register::<1>(s.id, Tensor::from_data(data, device)),
        2 => grads.register::<2>(s.id, Tensor::from_data(data, device)),
        3 => grads.register::<3>(s.id, Tensor::from_data(data, device)),
        _ => grads.register::<4>(s.id, Tensor::from_data(data, device)),
    }
}
