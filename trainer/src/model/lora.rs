//! One LoRA adapter on one projection: `y = x·Wᵀ + s · dropout(x)·Aᵀ·Bᵀ` with `W` frozen,
//! `A` `[r, in]`, `B` `[out, r]` — PEFT's layout. Attaching adapters to a whole model,
//! merging them and their PEFT files are in [`super::adapter`].

use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::{Int, Tensor};

/// One adapter on one projection.
#[derive(Module, Debug)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Param<Tensor<2>>,
    /// `[out, r]`.
    pub b: Param<Tensor<2>>,
    pub scale: f64,
    pub dropout: Dropout,
}

impl Lora {
    /// `base + s · dropout(x)·Aᵀ·Bᵀ`: the adapter added to its projection's output `base`
    /// (`[..., out]`), `x` `[..., in]`. The up-projection and the add are one op
    /// ([`kernels::lora_up`]), so the `[..., out]` low-rank product is never stored.
    pub fn add_to<const D: usize>(&self, base: Tensor<D>, x: Tensor<D>) -> Tensor<D> {
        let down = kernels::project(self.dropout.forward(x), self.a.val());
        kernels::lora_up(base, down, self.b.val(), self.scale)
    }

    /// The embedding adapter's delta for `ids` `[B, T]`: rows of `Aᵀ` (`A` is `[r, vocab]`)
    /// through `Bᵀ` (`B` is `[hidden, r]`), scaled; PEFT applies no dropout here.
    pub fn embedding_delta(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let down = burn::tensor::module::embedding(self.a.val().transpose(), ids);
        burn::tensor::module::linear(down, self.b.val().transpose(), None).mul_scalar(self.scale)
    }

    /// `s · B·A`, `[out, in]`: what merging adds to the base weight.
    pub fn merged_delta(&self) -> Tensor<2> {
        self.b.val().matmul(self.a.val()).mul_scalar(self.scale)
    }
}
