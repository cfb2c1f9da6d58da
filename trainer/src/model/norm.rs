use burn::module::{Module, Param};
use burn::tensor::Tensor;

/// RMSNorm with a learned scale; the math lives in `kernels`.
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    pub eps: f64,
}

impl RmsNorm {
    /// `x`: `[..., N]` → `[..., N]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        kernels::rms_norm(x, self.weight.val(), self.eps)
    }
}
