//! Half-precision compute (`train.bf16`, `train.fp16`), in the way mixed precision is done
//! where it works: the frozen weights are stored in the half dtype and the projections'
//! matmuls run in it, while what needs the range or the digits stays in f32 — trainable
//! weights (adapters, or every weight in full fine-tuning) as f32 masters cast at use,
//! RMSNorm, rotary positions, attention's softmax, and the head's log-softmax.

use burn::tensor::{DType, Tensor};

/// The dtype activations flow in between the f32 islands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Precision {
    /// From TRL's `bf16` / `fp16` flags (both at once is refused by the recipe).
    pub fn from_flags(bf16: bool, fp16: bool) -> Self {
        match (bf16, fp16) {
            (true, _) => Self::Bf16,
            (false, true) => Self::F16,
            _ => Self::F32,
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

/// `t` in `dtype`, without an op when it already is.
pub fn to<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}

/// `t` in f32.
pub fn f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    to(t, DType::F32)
}
