use burn::module::Module;
use burn::tensor::Tensor;

use super::linear::Linear;

/// The gated feed-forward block: `down(silu(gate(x)) · up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// `x`: `[B, T, hidden]` → `[B, T, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let hidden = kernels::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x));
        self.down_proj.forward(hidden)
    }
}
