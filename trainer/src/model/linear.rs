use burn::module::{Module, Param};
use burn::tensor::Tensor;

use super::lora::Lora;
use super::precision::{f32, to};
use super::quantized::QuantWeight;

/// A projection's weight: dense in Hugging Face's `[out, in]` layout, or frozen and
/// blockwise quantized (`model.quantize`).
/// (A few hundred bytes each, one per projection: the variants' size gap does not matter.)
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Weight {
    Dense(Param<Tensor<2>>),
    Quantized(QuantWeight),
}

impl Weight {
    /// `[rows, columns]`: a projection's `[out, in]`, an embedding table's `[vocab, hidden]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Weight::Dense(w) => w.shape().dims(),
            Weight::Quantized(q) => q.out_in(),
        }
    }

    /// The weight as a dense tensor: itself, or a quantized one dequantized (f32).
    pub fn dense(&self) -> Tensor<2> {
        match self {
            Weight::Dense(w) => w.val(),
            Weight::Quantized(q) => q.dequantize(),
        }
    }
}

/// A projection with the weight kept in Hugging Face's `[out, in]` layout, so loading,
/// saving and LoRA's `[r, in]` / `[out, r]` factors need no transposed copies. An attached
/// LoRA adds `s · dropout(x)·Aᵀ·Bᵀ` without ever forming `W + s·B·A`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Param<Tensor<1>>>,
    pub lora: Option<Lora>,
}

impl Linear {
    /// A dense projection.
    pub fn dense(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self {
            weight: Weight::Dense(Param::from_tensor(weight)),
            bias: bias.map(Param::from_tensor),
            lora: None,
        }
    }

    /// `x`: `[..., in]` → `[..., out]`.
    /// The matmul runs in `x`'s dtype (an f32 master weight is cast to it). Leading
    /// dimensions are flattened first: one `[rows, in]` product threads and packs the
    /// weight once, where a batch of `[T, in]` products packs it once per sequence, and the
    /// adapters' gradients need no sum over the batch.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let rows: Tensor<2> = x.reshape([-1, dims[D - 1] as i32]);
        let y = self.forward_rows(rows);
        let mut shape = dims;
        shape[D - 1] = y.dims()[1];
        y.reshape(shape)
    }

    /// `x`: `[rows, in]` → `[rows, out]`.
    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        let dtype = x.dtype();
        let base = match &self.weight {
            Weight::Quantized(q) => {
                let y = q.forward(x.clone());
                match &self.bias {
                    Some(b) => y + to(b.val(), dtype).unsqueeze(),
                    None => y,
                }
            }
            // Through `kernels::project`: a decoding step's row spreads its columns over
            // the cores, and with OpenBLAS loaded every product runs there.
            Weight::Dense(w) => {
                let y = kernels::project(x.clone(), to(w.val(), dtype));
                match &self.bias {
                    Some(b) => y + to(b.val(), dtype).unsqueeze(),
                    None => y,
                }
            }
        };
        match &self.lora {
            Some(lora) => lora.add_to(base, f32(x)),
            None => base,
        }
    }

    /// `[out, in]`.
    pub fn out_in(&self) -> [usize; 2] {
        self.weight.dims()
    }

    /// The weight as a dense tensor: itself, or a quantized one dequantized (f32).
    pub fn dense_weight(&self) -> Tensor<2> {
        self.weight.dense()
    }

    /// The dense weight's parameter, `None` when the weight is quantized.
    pub fn dense_param(&self) -> Option<&Param<Tensor<2>>> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Quantized(_) => None,
        }
    }
}
