//! `hearth selftest`: the fused ops against their references through the command line, as
//! the GPU check runs it, and its refusals.

mod common;
use common::{hearth, jsonl};

/// The small set in bf16 on flex passes, prints one line per case, and writes one JSON
/// object per case with every output's errors within its tolerance.
#[test]
fn small_selftest_passes_on_the_cpu_and_reports_every_case() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("selftest.jsonl");
    let run = hearth(&[
        "selftest",
        "--small",
        "--dtype",
        "bf16",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let cases = kernels::selftest::model_cases(true);
    assert!(
        stdout.contains(&format!("selftest: all {} cases pass on cpu", cases.len())),
        "{stdout}"
    );
    let lines = jsonl(&out);
    assert_eq!(lines.len(), cases.len());
    for (line, case) in lines.iter().zip(&cases) {
        assert_eq!(line["case"], case.label());
        assert_eq!(line["dtype"], "BF16");
        assert_eq!(line["pass"], true);
        let outputs = line["outputs"].as_array().unwrap();
        assert!(outputs.len() >= 2, "{line}");
        for o in outputs {
            assert!(o["max_rel"].as_f64().unwrap().is_finite(), "{o}");
            assert_eq!(o["bad"], 0, "{o}");
        }
        // Judged as bf16 (LoRA's f32 factors aside, whose gradients stay f32).
        let bf16 = |o: &serde_json::Value| (o["tol_rel"].as_f64().unwrap() - 5e-2).abs() < 1e-6;
        assert!(bf16(&outputs[0]), "{line}");
    }
}

#[test]
fn selftest_refuses_to_write_over_a_checkpoint_and_names_bad_devices() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), "{}").unwrap();
    let target = tmp.path().join("model.safetensors");
    std::fs::write(&target, b"weights").unwrap();
    let run = hearth(&["selftest", "--small", "--out", target.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refusing to write here"), "{stderr}");
    assert_eq!(std::fs::read(&target).unwrap(), b"weights");

    let run = hearth(&["selftest", "--small", "--device", "tpu"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tpu"), "{stderr}");
}

/// The CUDA build on a machine without an NVIDIA driver (CI's) says so in one line and
/// exits 1; it must not panic inside cudarc. With a driver present there is nothing to
/// check here: the GPU check runs the selftest on the device itself.
#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_driver_is_one_line() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        return;
    }
    let run = hearth(&["selftest", "--small", "--device", "cuda"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("no NVIDIA CUDA driver"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
