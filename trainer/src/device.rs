//! Choosing the burn device from a user's string. The CPU (`flex`) is always there; GPU
//! backends exist only when hearth was built with the matching cargo feature.

use burn::tensor::Device;

use crate::{Result, TrainerError};

/// Parses `cpu`/`flex`, `cuda[:N]` or `wgpu[:N]` into a device. Plain `wgpu` takes the
/// adapter wgpu prefers; `wgpu:N` the Nth discrete GPU.
pub fn parse(name: &str) -> Result<Device> {
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => {
            let i: usize = i.parse().map_err(|_| {
                TrainerError::Device(name.into(), "the index after `:` must be a number".into())
            })?;
            (k, Some(i))
        }
        None => (name, None),
    };
    match kind {
        "cpu" | "flex" => Ok(Device::flex()),
        "cuda" => cuda(name, index),
        "wgpu" => wgpu(name, index),
        _ => Err(TrainerError::Device(
            name.into(),
            "expected cpu, cuda[:N] or wgpu[:N]".into(),
        )),
    }
}

#[cfg(feature = "cuda")]
fn cuda(_name: &str, index: Option<usize>) -> Result<Device> {
    Ok(Device::cuda(index.unwrap_or(0)))
}

#[cfg(not(feature = "cuda"))]
fn cuda(name: &str, _index: Option<usize>) -> Result<Device> {
    Err(missing_feature(name, "cuda"))
}

#[cfg(feature = "wgpu")]
fn wgpu(_name: &str, index: Option<usize>) -> Result<Device> {
    use burn::tensor::DeviceKind;
    Ok(Device::wgpu(match index {
        None => DeviceKind::DefaultDevice,
        Some(i) => DeviceKind::DiscreteGpu(i),
    }))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu(name: &str, _index: Option<usize>) -> Result<Device> {
    Err(missing_feature(name, "wgpu"))
}

#[cfg(any(not(feature = "cuda"), not(feature = "wgpu")))]
fn missing_feature(name: &str, feature: &str) -> TrainerError {
    TrainerError::Device(
        name.into(),
        format!(
            "this hearth was built without the `{feature}` feature (cargo build --features {feature})"
        ),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_parse_or_explain() {
        assert!(super::parse("cpu").is_ok());
        assert!(super::parse("flex").is_ok());
        let err = super::parse("tpu").unwrap_err().to_string();
        assert!(
            err.contains("`tpu`") && err.contains("expected cpu"),
            "{err}"
        );
        let err = super::parse("cuda:x").unwrap_err().to_string();
        assert!(err.contains("index"), "{err}");
        #[cfg(not(feature = "cuda"))]
        assert!(
            super::parse("cuda:1")
                .unwrap_err()
                .to_string()
                .contains("--features cuda")
        );
    }
}
