//! What the trainer's end-to-end tests share.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use trainer::recipe::{Recipe, load};

/// The training losses a run logged, in step order.
pub fn losses(run: &Path) -> Vec<f64> {
    trainer::run_dir::read_metrics(run)
        .unwrap()
        .iter()
        .filter_map(|l| l["loss"].as_f64())
        .collect()
}

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A shipped recipe (`recipes/NAME`), pointed at this test's base model and at the bundled
/// data file `data/examples/DATA`, with `extra` overrides.
pub fn shipped_recipe(name: &str, data: &str, base: &Path, extra: &[&str]) -> Recipe {
    let mut sets = vec![
        format!("model.path=\"{}\"", base.display()),
        format!(
            "data.train=\"{}\"",
            root().join("data/examples").join(data).display()
        ),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    load(&root().join("recipes").join(name), &sets).unwrap()
}

/// burn's device generator is one per process: runs that seed and draw from it (adapter
/// initialisation, dropout, sampling) must not interleave across test threads.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

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

/// Every tensor of the PEFT adapter in `dir`, widened to f32, by name (sorted).
pub fn adapter_tensors(dir: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let files =
        checkpoints::WeightFiles::open_file(&dir.join("adapter_model.safetensors")).unwrap();
    let names: Vec<String> = files.names().map(String::from).collect();
    names
        .into_iter()
        .map(|n| {
            let values = files.get(&n).unwrap().to_f32().unwrap();
            (n, values)
        })
        .collect()
}
