use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::module::linear;

/// A projection with the weight kept in Hugging Face's `[out, in]` layout, so loading,
/// saving and LoRA's `[r, in]` / `[out, r]` factors need no transposed copies.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// `x`: `[..., in]` → `[..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(
            x,
            self.weight.val().transpose(),
            self.bias.as_ref().map(Param::val),
        )
    }
}
