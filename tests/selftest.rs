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

/// `--attention blocked` reaches the attention cases (their labels name the route), and
/// an unknown route is refused in one line.
#[test]
fn selftest_takes_the_attention_route() {
    let run = hearth(&[
        "selftest",
        "--small",
        "--dtype",
        "f32",
        "--attention",
        "blocked",
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}");
    let attention: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" attention "))
        .collect();
    assert!(!attention.is_empty(), "{stdout}");
    for line in &attention {
        assert!(line.contains(" blocked F32"), "{line}");
    }
    let run = hearth(&["selftest", "--small", "--attention", "fast"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
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

/// Sources `benches/gpu/cuda-env.sh` with `candidates` as its search list and a clean
/// environment; returns its line, its status, and the CUDA_PATH and LD_LIBRARY_PATH it left.
fn cuda_env(candidates: &[&std::path::Path]) -> (String, bool, String, String) {
    let list: Vec<&str> = candidates.iter().map(|p| p.to_str().unwrap()).collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/gpu/cuda-env.sh");
    let run = std::process::Command::new("bash")
        .args([
            "-c",
            r#". "$0"; rc=$?; printf '%s\n%s\n%s' "$rc" "${CUDA_PATH-}" "${LD_LIBRARY_PATH-}""#,
            script,
        ])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HEARTH_CUDA_CANDIDATES", list.join(" "))
        .output()
        .unwrap();
    let stdout = String::from_utf8(run.stdout).unwrap();
    let mut lines = stdout.lines();
    let line = lines.next().unwrap_or_default().to_string();
    let rc = lines.next() == Some("0");
    let cuda_path = lines.next().unwrap_or_default().to_string();
    let ld = lines.next().unwrap_or_default().to_string();
    (line, rc, cuda_path, ld)
}

/// The GPU check finds a toolkit CubeCL would miss: the first candidate holding the headers
/// becomes CUDA_PATH, and the folder holding its libnvrtc goes on the loader's path, in the
/// toolkit's layout and in pip's CUDA 12 one (nvrtc in a sibling package). With no headers
/// anywhere it says so in one line, fails, and exports nothing.
#[test]
fn the_gpu_check_finds_a_cuda_toolkit_off_cubecls_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let file = |rel: &str| {
        let path = tmp.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"").unwrap();
    };
    // Only a library: not a toolkit NVRTC can compile with.
    file("bare/lib64/libnvrtc.so.13");
    file("toolkit/include/cuda_fp16.h");
    file("toolkit/targets/x86_64-linux/lib/libnvrtc.so.13");
    file("nvidia/cuda_runtime/include/cuda_fp16.h");
    file("nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
    let at = |rel: &str| tmp.path().join(rel);
    let missing = at("missing");

    let (line, ok, cuda_path, ld) = cuda_env(&[&missing, &at("bare"), &at("toolkit")]);
    assert!(ok, "{line}");
    assert_eq!(cuda_path, at("toolkit").to_str().unwrap());
    assert_eq!(ld, at("toolkit/targets/x86_64-linux/lib").to_str().unwrap());
    assert!(
        line.starts_with("CUDA toolkit: ") && line.contains("NVRTC"),
        "{line}"
    );

    let (line, ok, cuda_path, ld) = cuda_env(&[&at("nvidia/cuda_runtime")]);
    assert!(ok, "{line}");
    assert_eq!(cuda_path, at("nvidia/cuda_runtime").to_str().unwrap());
    assert_eq!(
        ld,
        at("nvidia/cuda_runtime/../cuda_nvrtc/lib")
            .to_str()
            .unwrap()
    );

    let (line, ok, cuda_path, ld) = cuda_env(&[&missing, &at("bare")]);
    assert!(!ok, "{line}");
    assert!(
        line.contains("no headers") && line.contains("bare"),
        "{line}"
    );
    assert_eq!((cuda_path.as_str(), ld.as_str()), ("", ""));
}
