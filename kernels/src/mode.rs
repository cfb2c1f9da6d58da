//! Which implementation of the fused ops runs: the recipe's `kernels` switch.
//!
//! The choice is process-wide because it is a property of the run, like the device, and
//! the model's layers should not each carry it.

use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::Device;

use crate::launches::{self, Op};

/// `kernels = "fused" | "reference"` in a recipe; `auto` (the default) is fused: on the
/// Cube backends the CubeCL kernels, on flex the threaded ones of `cpu/`, which measured
/// faster than the reference at half its peak memory (BENCHMARKS.md). The reference
/// stays the specification the fused ops are tested against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Kernels {
    #[default]
    Auto,
    Fused,
    Reference,
}

impl Kernels {
    pub const NAMES: [&'static str; 3] = ["auto", "fused", "reference"];

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "fused" => Some(Self::Fused),
            "reference" => Some(Self::Reference),
            _ => None,
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the implementation for the rest of the process.
pub fn set_kernels(kernels: Kernels) {
    MODE.store(kernels as u8, Ordering::Relaxed);
}

pub fn kernels() -> Kernels {
    match MODE.load(Ordering::Relaxed) {
        1 => Kernels::Fused,
        2 => Kernels::Reference,
        _ => Kernels::Auto,
    }
}

/// Whether the fused path serves a tensor on `device` under the current setting (every
/// backend has one now, so the device no longer decides).
pub fn fused_on(_device: &Device) -> bool {
    match kernels() {
        Kernels::Fused | Kernels::Auto => true,
        Kernels::Reference => false,
    }
}

/// Whether `op` takes its fused path for a tensor on `device`, counted when it does: the
/// setting alone proves nothing about what ran.
pub(crate) fn takes_fused(op: Op, device: &Device) -> bool {
    let fused = fused_on(device);
    if fused {
        launches::took_fused_path(op);
    }
    fused
}

/// `train.attention` in a recipe: how the Cube backends (CUDA, wgpu) run fused attention.
///
/// - `flash`: the CubeCL flash kernel, forward and backward, O(T) memory and no `[T, S]`
///   scores anywhere, but scalar f32 arithmetic.
/// - `blocked`: a block of queries at a time through the backend's matmuls, the same
///   statistics and the same O(block·S) memory bound as the flex kernel, and on CUDA the
///   tensor cores that cubecl's matmul brings.
/// - `auto` (the default): flash, except for fewer than 16 queries per head (decoding),
///   where a flash cube would keep one thread of its 64 busy.
///
/// On flex the threaded blocked kernel of `cpu/` runs whichever is chosen. Which of the two
/// is faster on a given GPU is what the GPU bench's `blocked` path measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionPath {
    #[default]
    Auto,
    Flash,
    Blocked,
}

static ATTENTION: AtomicU8 = AtomicU8::new(0);

/// Sets the Cube backends' attention path for the rest of the process.
pub fn set_attention_path(path: AttentionPath) {
    ATTENTION.store(path as u8, Ordering::Relaxed);
}

pub fn attention_path() -> AttentionPath {
    match ATTENTION.load(Ordering::Relaxed) {
        1 => AttentionPath::Flash,
        2 => AttentionPath::Blocked,
        _ => AttentionPath::Auto,
    }
}
