use burn::module::Module;
use burn::tensor::{Bool, Tensor};

use super::linear::Linear;
use super::precision::to;

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
    /// Queries `[B, H, T, D]` and keys, values `[B, Hkv, T, D]` of `x` `[B, T, hidden]`, in
    /// the activations' dtype, as SDPA takes them under mixed precision: attention's
    /// products run in it (tensor cores on a GPU), its softmax and sums in f32, and the
    /// backward keeps half the bytes. Rotary positions compute in f32, from f32 tables.
    fn qkv(&self, x: Tensor<3>, cos: Tensor<3>, sin: Tensor<3>) -> [Tensor<4>; 3] {
        let [b, t, _] = x.dims();
        let dtype = x.dtype();
        // `to` is a no-op where a projection already answers in `dtype`; it keeps the
        // three in one dtype whatever a projection's weights are stored in.
        let heads = |proj: &Linear, n: usize| {
            to(proj.forward(x.clone()), dtype)
                .reshape([b, t, n, self.head_dim])
                .swap_dims(1, 2)
        };
        let rotated =
            |proj: &Linear, n: usize| kernels::rotary(heads(proj, n), cos.clone(), sin.clone());
        [
            rotated(&self.q_proj, self.num_heads),
            rotated(&self.k_proj, self.num_kv_heads),
            heads(&self.v_proj, self.num_kv_heads),
        ]
    }

    /// `[B, H, T, D]` back to `[B, T, hidden]` through the output projection.
    fn project_out(&self, out: Tensor<4>) -> Tensor<3> {
        let [b, _, t, _] = out.dims();
        self.o_proj.forward(
            out.swap_dims(1, 2)
                .reshape([b, t, self.num_heads * self.head_dim]),
        )
    }

    /// One generation step: `x` holds the new tokens `[B, n, hidden]`; their keys and values
    /// are appended to `cache` (kept in the activations' dtype), and `masked` is
    /// `[B, 1, n, S_total]`.
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        cos: Tensor<3>,
        sin: Tensor<3>,
        masked: Tensor<4, Bool>,
        cache: Option<LayerCache>,
    ) -> (Tensor<3>, LayerCache) {
        let [q, k, v] = self.qkv(x, cos, sin);
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(vec![c.k, k], 2), Tensor::cat(vec![c.v, v], 2)),
            None => (k, v),
        };
        let out = kernels::attention(q, k.clone(), v.clone(), masked);
        (self.project_out(out), LayerCache { k, v })
    }

    /// `x`: `[B, T, hidden]`; `cos`, `sin`: `[B, T, head_dim]`; `masked`: `[B, 1, T, T]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        cos: Tensor<3>,
        sin: Tensor<3>,
        masked: Tensor<4, Bool>,
    ) -> Tensor<3> {
        let [q, k, v] = self.qkv(x, cos, sin);
        self.project_out(kernels::attention(q, k, v, masked))
    }
}
