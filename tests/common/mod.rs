//! What the root package's end-to-end tests share.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

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
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics line {l:?}: {e}")))
        .collect()
}
