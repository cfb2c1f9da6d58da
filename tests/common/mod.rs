//! What the root package's end-to-end tests share.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;
use std::process::{Command, Output};

/// Runs the `hearth` binary of this build, with no backtrace to clutter its stderr.
pub fn hearth<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run hearth")
}

/// A path as the `&str` the commands take.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The command fails with exit code 1 and a single `error:` line containing every needle,
/// and no panic; returns that line.
pub fn fails<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], needles: &[&str]) -> String {
    let out = hearth(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "hearth {args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error"),
        "{stderr}"
    );
    for needle in needles {
        assert!(stderr.contains(needle), "`{needle}` missing from: {stderr}");
    }
    stderr
}

/// Every line of a JSON-lines file, parsed; a line that is not JSON fails the test.
pub fn jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: line {l:?}: {e}", path.display()))
        })
        .collect()
}

/// A copy of the directory tree `from` at `to` (a run directory to resume from twice, say).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Every line of a run's `metrics.jsonl`, parsed; a line that is not JSON fails the test.
pub fn metric_lines(run: &Path) -> Vec<serde_json::Value> {
    jsonl(&run.join("metrics.jsonl"))
}

/// Starts the child with SIGHUP at its default action (`ignore: false`) or ignored, as
/// `nohup` leaves it: the test's own disposition (a CI job may run under nohup) must not
/// decide what hearth does.
#[allow(dead_code)]
pub fn hup(command: &mut Command, ignore: bool) -> &mut Command {
    use std::os::unix::process::CommandExt;
    let action = if ignore { libc::SIG_IGN } else { libc::SIG_DFL };
    // SAFETY: between fork and exec only `signal`, which is async-signal-safe, runs.
    unsafe {
        command.pre_exec(move || {
            libc::signal(libc::SIGHUP, action);
            Ok(())
        })
    }
}
