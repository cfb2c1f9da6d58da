use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use super::linear::Linear;
use super::precision::{f32, to};

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

/// Keys and values of the tokens seen so far, per layer: `[B, Hkv, S, D]` each.
#[derive(Debug, Clone)]
pub struct LayerCache {
    pub k: Tensor<4>,
    pub v: Tensor<4>,
}

impl Attention {
    /// One generation step: `x` holds the new tokens `[B, n, hidden]`; their keys and values
    /// are appended to `cache`, and `masked` is `[B, 1, n, S_total]`.
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        cos: Tensor<3>,
        sin: Tensor<3>,
        masked: Tensor<4, Bool>,
        cache: Option<LayerCache>,
    ) -> (Tensor<3>, LayerCache) {
        let [b, t, _] = x.dims();
        let dtype = x.dtype();
        // Rotary positions and the softmax run in f32 (so does the cache).
        let heads = |proj: &Linear, n: usize| {
            f32(proj.forward(x.clone()))
                .reshape([b, t, n, self.head_dim])
                .swap_dims(1, 2)
        };
        let q = kernels::rotary(
            heads(&self.q_proj, self.num_heads),
            cos.clone(),
            sin.clone(),
        );
        let k = kernels::rotary(heads(&self.k_proj, self.num_kv_heads), cos, sin);
        let v = heads(&self.v_proj, self.num_kv_heads);
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        };
        let out = kernels::attention(q, k.clone(), v.clone(), masked);
        let out = out
            .swap_dims(1, 2)
            .reshape([b, t, self.num_heads * self.head_dim]);
        (self.o_proj.forward(to(out, dtype)), LayerCache { k, v })
    }

    /// `x`: `[B, T, hidden]`; `cos`, `sin`: `[B, T, head_dim]`; `masked`: `[B, 1, T, T]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: Tensor<3>,
        sin: Tensor<3>,
        masked: Tensor<4, Bool>,
    ) -> Tensor<3> {
        let [b, t, _] = x.dims();
        let dtype = x.dtype();
        // Rotary positions and the softmax run in f32.
        let heads = |proj: &Linear, n: usize| {
            f32(proj.forward(x.clone()))
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
        self.o_proj.forward(to(out, dtype))
    }
}
