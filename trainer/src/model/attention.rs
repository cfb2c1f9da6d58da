use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use super::linear::Linear;

/// Multi-head self-attention with grouped key/value heads and rotary positions.
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `x`: `[B, T, hidden]`; `cos`, `sin`: `[B, T, head_dim]`; `masked`: `[B, 1, T, T]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: Tensor<3>,
        sin: Tensor<3>,
        masked: Tensor<4, Bool>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let heads = |proj: &Linear, n: usize| {
            proj.forward(x.clone())
                .reshape([b, t, n, self.head_dim])
                .swap_dims(1, 2)
        };
        let q = heads(&self.q_proj, self.num_heads);
        let k = heads(&self.k_proj, self.num_kv_heads);
        let v = heads(&self.v_proj, self.num_kv_heads);
        let q = kernels::rotary(q, cos.clone(), sin.clone());
        let k = kernels::rotary(k, cos, sin);
        let out = kernels::attention(q, k, v, masked);
        let out = out
            .swap_dims(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        self.o_proj.forward(out)
    }
}
