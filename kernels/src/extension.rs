//! The backend extension: one trait whose methods are the fused ops' forward and backward
//! halves on backend primitives.
//!
//! The default bodies are the portable twin, written with the backend's own primitive ops:
//! they are what flex (and any backend without kernels) runs. The Cube backends override
//! them with CubeCL kernels (`cube`), Fusion defers those kernels lazily, and the
//! `Autodiff` implementation (`autodiff`) records one graph node per op whose backward
//! calls the `*_backward` methods, so gradients never go through the forward's
//! intermediate tensors.
//!
//! Shapes: every op works on rows, `[N, C]`; the tensor-level wrappers in `fused` flatten
//! leading dimensions first.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, TensorMetadata, backend_extension};
use burn::tensor::FloatDType;

#[backend_extension(
    Autodiff,
    Flex,
    Cube: cfg(feature = "gpu"),
    Fusion: cfg(feature = "gpu")
)]
pub trait FusedOps: Backend {
    /// RMSNorm of each row, as transformers computes it: `cast(x·r)·w` with
    /// `r = 1/√(mean(x²) + eps)` taken in f32. `x`: `[N, C]`, `weight`: `[C]`.
    #[fusion(dtype = x, shape = x)]
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f32) -> FloatTensor<Self> {
        let (inv, dtype) = inv_rms::<Self>(x.clone(), eps);
        let normed = Self::float_cast(Self::float_mul(f32_of::<Self>(x), inv), dtype);
        Self::float_mul(normed, row_vector::<Self>(weight))
    }

    /// The gradients of [`FusedOps::rms_norm`] for the output gradient `grad`: `dx`
    /// `[N, C]`, and each row's share of `dw` (`[N, C]`, summed over rows by the caller):
    /// `dx = r·w·g − (r³/C)·x·Σ(g·w·x)`, `dw_row = g·x·r`.
    #[fusion(meta = |x, _w, _g, _eps| (x.clone(), x.clone()))]
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let cols = x.shape().dims::<2>()[1];
        let (inv, dtype) = inv_rms::<Self>(x.clone(), eps);
        let x32 = f32_of::<Self>(x);
        let g32 = f32_of::<Self>(grad);
        let w32 = row_vector::<Self>(f32_of::<Self>(weight));
        let gw = Self::float_mul(g32.clone(), w32);
        let dot = Self::float_sum_dim(Self::float_mul(gw.clone(), x32.clone()), 1);
        let inv3 = Self::float_mul(Self::float_mul(inv.clone(), inv.clone()), inv.clone());
        let coef = Self::float_mul_scalar(Self::float_mul(inv3, dot), (1.0 / cols as f64).into());
        let dx = Self::float_sub(
            Self::float_mul(gw, inv.clone()),
            Self::float_mul(x32.clone(), coef),
        );
        let dw_rows = Self::float_mul(Self::float_mul(g32, x32), inv);
        (
            Self::float_cast(dx, dtype),
            Self::float_cast(dw_rows, dtype),
        )
    }

    /// The gated activation `silu(gate)·up`, elementwise. `gate`, `up`: `[N, C]`.
    #[fusion(dtype = gate, shape = gate)]
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let s = Self::sigmoid(gate.clone());
        Self::float_mul(Self::float_mul(gate, s), up)
    }

    /// The gradients of [`FusedOps::swiglu`]: with `s = σ(gate)`,
    /// `d_gate = g·up·s·(1 + gate·(1 − s))` and `d_up = g·gate·s`.
    #[fusion(meta = |gate, _up, _g| (gate.clone(), gate.clone()))]
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let s = Self::sigmoid(gate.clone());
        let silu = Self::float_mul(gate.clone(), s.clone());
        // 1 + gate·(1 − s) = 1 + gate − gate·s
        let slope = Self::float_add_scalar(Self::float_sub(gate, silu.clone()), 1.0.into());
        let d_gate = Self::float_mul(Self::float_mul(grad.clone(), up), Self::float_mul(s, slope));
        let d_up = Self::float_mul(grad, silu);
        (d_gate, d_up)
    }
}

impl FusedOps for Flex {}

/// `1/√(mean(x²) + eps)` per row, `[N, 1]` in f32, and `x`'s own float dtype.
fn inv_rms<B: Backend>(x: FloatTensor<B>, eps: f32) -> (FloatTensor<B>, FloatDType) {
    let dtype: FloatDType = x.dtype().into();
    let x32 = f32_of::<B>(x);
    let ms = B::float_mean_dim(B::float_mul(x32.clone(), x32), 1);
    let inv = B::float_recip(B::float_sqrt(B::float_add_scalar(ms, eps.into())));
    (inv, dtype)
}

fn f32_of<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_cast(x, FloatDType::F32)
}

/// `[C]` → `[1, C]`, to broadcast over rows.
fn row_vector<B: Backend>(w: FloatTensor<B>) -> FloatTensor<B> {
    let c = w.shape().dims::<1>()[0];
    B::float_reshape(w, [1, c].into())
}
