//! `hearth selftest`: every fused op against its reference at real model shapes, on the
//! device under test, each case reported as it finishes (a GPU check reads the lines live).

use std::io::Write;
use std::path::Path;

use burn::tensor::{DType, Device};
use kernels::selftest::{Report, model_cases};

use crate::TrainerError;

/// The dtypes checked when none are named: f32 and bf16, or f32 alone on `wgpu`, whose
/// shaders (WGSL, and Vulkan's SPIR-V as burn emits it) have no bf16, so every bf16 case
/// there would fail for want of the type rather than for a kernel's fault.
pub fn default_dtypes(device_name: &str) -> Vec<DType> {
    match device_name.split(':').next() {
        Some("wgpu") => vec![DType::F32],
        _ => vec![DType::F32, DType::BF16],
    }
}

/// Runs every case in every dtype on `device` (named `device_name` in messages), sending
/// one line per case to `emit` and, with `out`, one JSON object per case to that file as
/// soon as the case is done. A case that panics (a kernel that fails to compile for a
/// dtype, say) is recorded as failed and the rest go on; any failure ends in an error
/// naming the failed cases.
pub fn run<E: From<TrainerError>>(
    device: &Device,
    device_name: &str,
    dtypes: &[DType],
    small: bool,
    out: Option<&Path>,
    mut emit: impl FnMut(&str) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut log = match out {
        Some(out) => {
            checkpoints::guard::check_output_file(out, &[]).map_err(TrainerError::from)?;
            Some(std::fs::File::create(out).map_err(|e| io(out, "creating", e))?)
        }
        None => None,
    };
    let (mut failed, mut total) = (Vec::new(), 0);
    for &dtype in dtypes {
        for case in model_cases(small) {
            total += 1;
            let label = format!("{} {dtype:?}", case.label());
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case.run(device, dtype)));
            let record = match run {
                Ok(report) => {
                    emit(&summary(&label, &report))?;
                    if !report.pass() {
                        emit(&format!("{report}"))?;
                        failed.push(label.clone());
                    }
                    case_json(case.label(), case.op(), dtype, &report)
                }
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into());
                    emit(&format!("FAIL {label}: {why}"))?;
                    failed.push(label.clone());
                    serde_json::json!({"case": case.label(), "op": case.op(),
                        "dtype": format!("{dtype:?}"), "pass": false, "panic": why})
                }
            };
            if let (Some(file), Some(out)) = (log.as_mut(), out) {
                writeln!(file, "{record}")
                    .and_then(|()| file.flush())
                    .map_err(|e| io(out, "writing", e))?;
            }
        }
    }
    if !failed.is_empty() {
        return Err(TrainerError::Input(format!(
            "selftest: {} of {total} cases failed on {device_name}: {}",
            failed.len(),
            failed.join(", ")
        ))
        .into());
    }
    emit(&format!(
        "selftest: all {total} cases pass on {device_name}"
    ))
}

fn io(path: &Path, doing: &str, e: std::io::Error) -> TrainerError {
    TrainerError::Input(format!("{doing} {}: {e}", path.display()))
}

/// The case's line: its verdict, worst relative error, time and launched kernels.
fn summary(label: &str, report: &Report) -> String {
    let worst = report
        .outputs
        .iter()
        .map(|c| c.max_rel)
        .fold(0.0f32, f32::max);
    let kernels: Vec<String> = report
        .kernels
        .iter()
        .map(|(k, n)| format!("{k:?}×{n}"))
        .collect();
    format!(
        "{} {label}: worst rel {worst:.2e}, {:.1} s, kernels [{}]",
        if report.pass() { "pass" } else { "FAIL" },
        report.seconds,
        kernels.join(" ")
    )
}

fn case_json(label: String, op: &str, dtype: DType, report: &Report) -> serde_json::Value {
    serde_json::json!({
        "case": label,
        "op": op,
        "dtype": format!("{dtype:?}"),
        "pass": report.pass(),
        "seconds": report.seconds,
        "kernels": report.kernels.iter().map(|(k, n)| (format!("{k:?}"), *n))
            .collect::<std::collections::BTreeMap<_, _>>(),
        "outputs": report.outputs.iter().map(|c| serde_json::json!({
            "name": c.name,
            "max_abs": c.max_abs,
            "max_rel": c.max_rel,
            "bad": c.bad,
            "of": c.len,
            "tol_abs": c.tolerance.abs,
            "tol_rel": c.tolerance.rel,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wgpu, with or without an adapter index, checks f32 alone by default; every other
    /// device checks f32 and bf16.
    #[test]
    fn default_dtypes_leave_bf16_out_on_wgpu_only() {
        for wgpu in ["wgpu", "wgpu:1"] {
            assert_eq!(default_dtypes(wgpu), [DType::F32], "{wgpu}");
        }
        for other in ["cpu", "flex", "cuda", "cuda:0"] {
            assert_eq!(default_dtypes(other), [DType::F32, DType::BF16], "{other}");
        }
    }
}
