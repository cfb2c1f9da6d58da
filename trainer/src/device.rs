//! Choosing the burn device from a user's string. The CPU (`flex`) is always there; GPU
//! backends exist only when hearth was built with the matching cargo feature.

use burn::tensor::Device;

use crate::{Result, TrainerError};

/// Parses `cpu`/`flex`, `cuda[:N]` or `wgpu` into a device.
pub fn parse(name: &str) -> Result<Device> {
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().map_err(|_| {
                TrainerError::Device(name.into(), "the index after `:` must be a number".into())
            })?;
            (k, i)
        }
        None => (name, 0),
    };
    match kind {
        "cpu" | "flex" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(index)),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            let _ = index;
            Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice))
        }
        "cuda" | "wgpu" => Err(TrainerError::Device(
            name.into(),
            format!("this hearth was built without the `{kind}` feature"),
        )),
        _ => {
            let _ = index;
            Err(TrainerError::Device(
                name.into(),
                "expected cpu, cuda[:N] or wgpu".into(),
            ))
        }
    }
}
