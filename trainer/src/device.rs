//! Choosing the burn device from a user's string. The CPU (`flex`) is always there; GPU
//! backends exist only when hearth was built with the matching cargo feature.

use burn::tensor::Device;

use crate::{Result, TrainerError};

/// Makes the CPU burn's default device, unless the user chose one with `BURN_DEVICE`.
///
/// hearth names its devices everywhere, but burn materializes a resumed optimizer state on
/// its default device before moving it to each parameter's on the next step. That default
/// is the first GPU backend built in: a CPU run would start Vulkan or CUDA (and fail where
/// neither is installed), and every rank of a data-parallel resume would put its whole Adam
/// state on GPU 0. On the CPU, the state is only bytes on their way to the right device.
///
/// # Safety
/// Sets an environment variable: call it before any other thread exists (first thing in
/// `main`), when nothing can read the environment at the same time.
pub unsafe fn pin_default_device_to_cpu() {
    if std::env::var_os("BURN_DEVICE").is_none() {
        // SAFETY: the caller guarantees that no other thread is running.
        unsafe { std::env::set_var("BURN_DEVICE", "flex") };
    }
}

/// Parses `cpu`/`flex`, `cuda[:N]` or `wgpu[:N]` into a device. Plain `wgpu` takes the
/// adapter wgpu prefers; `wgpu:N` the Nth discrete GPU.
pub fn parse(name: &str) -> Result<Device> {
    let (kind, index) = split(name).map_err(|why| TrainerError::Device(name.into(), why))?;
    match kind {
        "cuda" => cuda(name, index),
        "wgpu" => wgpu(name, index),
        _ => Ok(Device::flex()),
    }
}

/// A device name's kind (`cpu`, `cuda` or `wgpu`) and index, without opening it: what a
/// recipe can be checked for before anything runs.
pub fn split(name: &str) -> std::result::Result<(&str, Option<usize>), String> {
    let (kind, index) = match name.split_once(':') {
        Some((k, i)) => {
            let i: usize = i
                .parse()
                .map_err(|_| "the index after `:` must be a number".to_string())?;
            (k, Some(i))
        }
        None => (name, None),
    };
    match kind {
        "cpu" | "flex" => Ok(("cpu", index)),
        "cuda" | "wgpu" => Ok((kind, index)),
        _ => Err("expected cpu, cuda[:N] or wgpu[:N]".into()),
    }
}

/// Checks for the driver and the GPU before handing burn the device: burn would otherwise
/// find out on its first kernel, in a worker thread, and panic there.
#[cfg(feature = "cuda")]
fn cuda(name: &str, index: Option<usize>) -> Result<Device> {
    let device_err = |why: String| TrainerError::Device(name.into(), why);
    // SAFETY: only tries to load the driver library, to see whether it is there.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(device_err(
            "no NVIDIA CUDA driver was found (libcuda could not be loaded); install the \
             NVIDIA driver or use device = \"cpu\""
                .into(),
        ));
    }
    cudarc::driver::result::init()
        .map_err(|e| device_err(format!("the CUDA driver did not start: {e}")))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| device_err(format!("counting GPUs: {e}")))?;
    let i = index.unwrap_or(0);
    if i >= count.max(0) as usize {
        return Err(device_err(format!(
            "GPU {i} was asked for, but the driver sees {count}"
        )));
    }
    // SAFETY: only tries to load the NVRTC library, to see whether it is there.
    let nvrtc = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if let Some(gap) = toolkit_gap(nvrtc, kernels::cuda_toolkit().as_deref()) {
        return Err(device_err(gap));
    }
    Ok(Device::cuda(i))
}

/// What CubeCL's run-time kernel compiles lack, if anything: every kernel goes through
/// NVRTC, which the driver does not bring, with the toolkit's `include/` (`cuda_fp16.h`,
/// `cuda_bf16.h`, `mma.h`). Either missing would panic at the first kernel instead.
#[cfg(any(test, feature = "cuda"))]
fn toolkit_gap(nvrtc_loads: bool, toolkit: Option<&std::path::Path>) -> Option<String> {
    if !nvrtc_loads {
        return Some(
            "NVRTC (libnvrtc.so, from the CUDA toolkit) could not be loaded, and hearth \
             compiles its GPU kernels with it; add the toolkit's lib64 folder to \
             LD_LIBRARY_PATH"
                .into(),
        );
    }
    let Some(toolkit) = toolkit else {
        return Some(
            "no CUDA toolkit was found for NVRTC's headers (looked at CUDA_PATH, \
             /usr/local/cuda, /opt/cuda and /usr); set CUDA_PATH to the folder holding \
             include/cuda_fp16.h"
                .into(),
        );
    };
    let header = toolkit.join("include").join("cuda_fp16.h");
    (!header.exists()).then(|| {
        format!(
            "the CUDA toolkit at {} has no {}; set CUDA_PATH to the folder holding \
             include/cuda_fp16.h",
            toolkit.display(),
            header.display()
        )
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda(name: &str, _index: Option<usize>) -> Result<Device> {
    Err(missing_feature(name, "cuda"))
}

/// Checks that wgpu has the adapter asked for before handing burn the device: burn would
/// otherwise panic in its device thread (`wgpu:1` on a machine with one GPU, or `wgpu` on
/// one with no adapter at all).
#[cfg(feature = "wgpu")]
fn wgpu(name: &str, index: Option<usize>) -> Result<Device> {
    use burn::tensor::DeviceKind;
    let instance = ::wgpu::Instance::default();
    let adapters =
        futures_lite::future::block_on(instance.enumerate_adapters(::wgpu::Backends::all()));
    let infos: Vec<::wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let seen = || {
        if infos.is_empty() {
            "none".to_string()
        } else {
            infos
                .iter()
                .map(|i| format!("{} ({:?}, {:?})", i.name, i.device_type, i.backend))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    match index {
        None if infos.is_empty() => Err(TrainerError::Device(
            name.into(),
            "wgpu finds no adapter (no Vulkan, Metal, DirectX or GL driver); install one, or \
             use device = \"cpu\""
                .into(),
        )),
        None => Ok(Device::wgpu(DeviceKind::DefaultDevice)),
        Some(i) => {
            let discrete = infos
                .iter()
                .filter(|a| a.device_type == ::wgpu::DeviceType::DiscreteGpu)
                .count();
            if i >= discrete {
                return Err(TrainerError::Device(
                    name.into(),
                    format!(
                        "`wgpu:{i}` is discrete GPU {i}, and wgpu sees {discrete} discrete GPUs \
                         among its adapters: {}; plain `wgpu` takes the adapter wgpu prefers",
                        seen()
                    ),
                ));
            }
            Ok(Device::wgpu(DeviceKind::DiscreteGpu(i)))
        }
    }
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
    /// Where the CUDA build runs on a machine without the driver (CI's link check, a
    /// laptop), `cuda` is one line saying so, not burn's panic in a worker thread. On a
    /// machine with the driver the GPU check exercises the other path.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_without_a_driver_says_so() {
        // SAFETY: only tries to load the driver library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            return;
        }
        let err = super::parse("cuda").unwrap_err().to_string();
        assert!(err.contains("no NVIDIA CUDA driver"), "{err}");
    }

    /// A driver alone does not compile kernels: without NVRTC, or without a toolkit whose
    /// headers NVRTC can include, `cuda` is refused in one line saying what to set.
    #[test]
    fn cuda_without_nvrtc_or_its_headers_says_what_to_set() {
        let tmp = tempfile::tempdir().unwrap();
        let gap = |nvrtc, dir: Option<&std::path::Path>| super::toolkit_gap(nvrtc, dir);
        let err = gap(false, Some(tmp.path())).unwrap();
        assert!(
            err.contains("NVRTC") && err.contains("LD_LIBRARY_PATH"),
            "{err}"
        );
        let err = gap(true, None).unwrap();
        assert!(
            err.contains("no CUDA toolkit") && err.contains("CUDA_PATH"),
            "{err}"
        );
        let err = gap(true, Some(tmp.path())).unwrap();
        assert!(
            err.contains(&tmp.path().display().to_string()) && err.contains("cuda_fp16.h"),
            "{err}"
        );
        std::fs::create_dir(tmp.path().join("include")).unwrap();
        std::fs::write(tmp.path().join("include/cuda_fp16.h"), "").unwrap();
        assert_eq!(gap(true, Some(tmp.path())), None);
        for err in [gap(false, None), gap(true, None)].into_iter().flatten() {
            assert_eq!(err.lines().count(), 1, "{err}");
        }
    }

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
