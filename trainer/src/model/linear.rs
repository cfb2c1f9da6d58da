use burn::module::{Module, Param};
use burn::tensor::Tensor;
use burn::tensor::module::linear;

use super::lora::Lora;
use super::precision::{f32, to};

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
    /// The matmul runs in `x`'s dtype (an f32 master weight is cast to it).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        // Few rows (a decoding step) spread their columns over the cores; more rows are
        // the plain matmul.
        let base = if x.dims()[..D - 1].iter().product::<usize>() <= kernels::FEW_ROWS {
            let y = kernels::project(x.clone(), to(self.weight.val(), dtype));
            match &self.bias {
                Some(b) => y + to(b.val(), dtype).unsqueeze(),
                None => y,
            }
        } else {
            linear(
                x.clone(),
                to(self.weight.val(), dtype).transpose(),
                self.bias.as_ref().map(|b| to(b.val(), dtype)),
            )
        };
        match &self.lora {
            Some(lora) => lora.add_to(base, f32(x)),
            None => base,
        }
    }

    /// `[out, in]` and `[out]` sizes.
    pub fn out_in(&self) -> [usize; 2] {
        self.weight.shape().dims()
    }
}
