use burn::module::{Module, Param};
use burn::tensor::Tensor;

use super::precision::{f32, to};

/// RMSNorm with a learned scale; the math lives in `kernels`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    /// `x`: `[..., N]` → `[..., N]`.
    /// Computed in f32 and returned in `x`'s dtype, as transformers does.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        to(
            kernels::rms_norm(f32(x), f32(self.weight.val()), self.eps),
            dtype,
        )
    }
}
