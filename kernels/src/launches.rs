//! Counters of what ran: how often each fused op took its fused path, and how often each
//! CubeCL kernel was launched. A setting that says "fused" proves nothing about what
//! executed; these let a test assert that a run really went through the kernels, and that
//! a reference run went through none.

use std::sync::atomic::{AtomicU64, Ordering};

/// A CubeCL kernel (forward or backward) of a fused op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    RmsNorm,
    RmsNormBackward,
    Rotary,
    RotaryBackward,
    Swiglu,
    SwigluBackward,
    Attention,
    AttentionBackward,
    LoraUp,
    LogitRows,
    LogitGrads,
    LogitRowsSlopes,
    QuantMatmul,
    QuantMatmulBackward,
}

impl Kernel {
    pub const ALL: [Kernel; 14] = [
        Kernel::RmsNorm,
        Kernel::RmsNormBackward,
        Kernel::Rotary,
        Kernel::RotaryBackward,
        Kernel::Swiglu,
        Kernel::SwigluBackward,
        Kernel::Attention,
        Kernel::AttentionBackward,
        Kernel::LoraUp,
        Kernel::LogitRows,
        Kernel::LogitGrads,
        Kernel::LogitRowsSlopes,
        Kernel::QuantMatmul,
        Kernel::QuantMatmulBackward,
    ];
}

/// A fused op, whichever backend serves it (CubeCL kernels, or the primitive-op twin).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    RmsNorm,
    Swiglu,
    LoraUp,
    TokenLogprobs,
    Attention,
    Rotary,
}

impl Op {
    pub const ALL: [Op; 6] = [
        Op::RmsNorm,
        Op::Swiglu,
        Op::LoraUp,
        Op::TokenLogprobs,
        Op::Attention,
        Op::Rotary,
    ];
}

static KERNELS: [AtomicU64; Kernel::ALL.len()] = [const { AtomicU64::new(0) }; Kernel::ALL.len()];
static FUSED: [AtomicU64; Op::ALL.len()] = [const { AtomicU64::new(0) }; Op::ALL.len()];

#[cfg_attr(not(feature = "gpu"), allow(dead_code))]
pub(crate) fn launched(kernel: Kernel) {
    KERNELS[kernel as usize].fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn took_fused_path(op: Op) {
    FUSED[op as usize].fetch_add(1, Ordering::Relaxed);
}

/// The counts since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    kernels: [u64; Kernel::ALL.len()],
    fused: [u64; Op::ALL.len()],
}

impl Counts {
    pub fn now() -> Self {
        let mut c = Self::default();
        for (slot, n) in c.kernels.iter_mut().zip(&KERNELS) {
            *slot = n.load(Ordering::Relaxed);
        }
        for (slot, n) in c.fused.iter_mut().zip(&FUSED) {
            *slot = n.load(Ordering::Relaxed);
        }
        c
    }

    /// Launches of `kernel` counted here.
    pub fn kernel(&self, kernel: Kernel) -> u64 {
        self.kernels[kernel as usize]
    }

    /// Calls of `op` that took the fused path.
    pub fn fused(&self, op: Op) -> u64 {
        self.fused[op as usize]
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Counts) -> Counts {
        let mut d = *self;
        for (a, b) in d.kernels.iter_mut().zip(&earlier.kernels) {
            *a -= b;
        }
        for (a, b) in d.fused.iter_mut().zip(&earlier.fused) {
            *a -= b;
        }
        d
    }
}
