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
