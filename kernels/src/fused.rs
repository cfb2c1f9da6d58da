//! The fused ops at the tensor level, gathered: what the model calls when
//! [`crate::Kernels::Fused`] is in force, each written beside its reference in
//! `ops/<op>.rs`. Each flattens its input to rows and calls its backend extension through
//! `Dispatch`: a CubeCL kernel on Cube backends, the primitive-op twin elsewhere, a single
//! autodiff node with a hand-written backward under autodiff.

pub use crate::ops::attention::{ATTENTION_BLOCK, attention_blocked, fused as attention};
pub use crate::ops::logprobs::fused as token_logprobs;
pub use crate::ops::lora::fused as lora_up;
pub use crate::ops::rms_norm::fused as rms_norm;
pub use crate::ops::rotary::fused as rotary;
pub use crate::ops::swiglu::fused as swiglu;
