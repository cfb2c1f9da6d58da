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

/// Token ids, their mask and the reference logits a fixture's `cases.safetensors` holds.
pub struct Cases {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub logits: Vec<f32>,
    pub b: usize,
    pub t: usize,
    pub v: usize,
}

pub fn read_cases(path: &Path) -> Cases {
    let f = checkpoints::WeightFiles::open_file(path).expect("cases");
    let ids = f.get("input_ids").unwrap();
    let [b, t] = [ids.shape[0], ids.shape[1]];
    let logits = f.get("logits").unwrap();
    Cases {
        ids: ids.to_i64().unwrap(),
        mask: f.get("attention_mask").unwrap().to_i64().unwrap(),
        v: logits.shape[2],
        logits: logits.to_f32().unwrap(),
        b,
        t,
    }
}

/// The first `n` bundled dialogues, tokenised through the template and tokenizer of the
/// model at `model` (a checkpoint directory or a GGUF file), padded into one batch.
pub fn bundled_batch(model: &Path, n: usize, max_length: usize) -> data::batch::Batch {
    use data::tokenize::{Tokenized, Tokenizing, Truncation, TruncationCounts};
    let path = root().join("data/examples/counseling-sft.jsonl");
    let loaded = data::load_examples(&path, &data::LoadOptions::default()).unwrap();
    let template = data::ChatTemplate::from_dir(model, None).unwrap().unwrap();
    let tokenizer = data::tokenizer::load(model).unwrap();
    let t = Tokenizing {
        template: &template,
        tokenizer: &tokenizer,
        max_length,
        truncation: Truncation::KeepEnd,
    };
    let mut counts = TruncationCounts::default();
    let seqs: Vec<_> = loaded.examples[..n]
        .iter()
        .filter_map(|e| match t.example(e, &mut counts).unwrap() {
            Some(Tokenized::Sequence(s)) => Some(s),
            _ => None,
        })
        .collect();
    let refs: Vec<_> = seqs.iter().collect();
    data::batch::Batch::padded(&refs, 0)
}
