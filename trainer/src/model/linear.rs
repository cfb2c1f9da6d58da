use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::module::linear;

use super::lora::Lora;

/// A projection with the weight kept in Hugging Face's `[out, in]` layout, so loading,
/// saving and LoRA's `[r, in]` / `[out, r]` factors need no transposed copies. An attached
/// LoRA adds `s · dropout(x)·Aᵀ·Bᵀ` without ever forming `W + s·B·A`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// `x`: `[..., in]` → `[..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let base = linear(
            x.clone(),
            self.weight.val().transpose(),
            self.bias.as_ref().map(Param::val),
        );
        match &self.lora {
            Some(lora) => base + lora.delta(x),
            None => base,
        }
    }

    /// `[out, in]` and `[out]` sizes.
    pub fn out_in(&self) -> [usize; 2] {
        self.weight.shape().dims()
    }
}
