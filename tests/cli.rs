//! End-to-end tests of the `hearth` binary: logits against the transformers fixtures,
//! save → load identity for models hearth makes, and one-line errors for bad input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use checkpoints::{OwnedTensor, WeightDtype, WeightFiles};

mod common;
use common::{copy_dir, fails, hearth, jsonl, metric_lines, s};

fn ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) {
    let out = hearth(args);
    assert!(
        out.status.success(),
        "hearth {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn fixture(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/parity")
        .join(name);
    assert!(dir.is_dir(), "fixture {} is missing", dir.display());
    dir
}

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let files = WeightFiles::open_file(path).unwrap();
    let t = files.get(name).unwrap();
    (t.shape.to_vec(), t.to_f32().unwrap())
}

fn write_cases(path: &Path, ids: &[i64], mask: &[i64], shape: [usize; 2]) {
    let tensors = BTreeMap::from([
        (
            "input_ids".to_string(),
            OwnedTensor::from_i64(ids, shape.to_vec()),
        ),
        (
            "attention_mask".to_string(),
            OwnedTensor::from_i64(mask, shape.to_vec()),
        ),
    ]);
    checkpoints::write_safetensors(path, &tensors).unwrap();
}

fn logits(model: &Path, cases: &Path, out: &Path) -> Vec<f32> {
    ok(&[
        "logits",
        "--model",
        s(model),
        "--input",
        s(cases),
        "--out",
        s(out),
    ]);
    read_f32(out, "logits").1
}

/// `hearth logits` of `model` (with `adapter`) on `text`, written to `out` and read back.
fn logits_of_text(model: &Path, adapter: Option<&Path>, text: &str, out: &Path) -> Vec<f32> {
    let mut args = vec![
        "logits",
        "--model",
        s(model),
        "--text",
        text,
        "--out",
        s(out),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    ok(&args);
    read_f32(out, "logits").1
}

fn max_abs_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn logits_command_matches_transformers_on_both_fixtures() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["tiny-llama-f32", "tiny-llama-bf16"] {
        let dir = fixture(name);
        let cases = dir.join("cases.safetensors");
        let out = tmp.path().join(format!("{name}.safetensors"));
        let ours = logits(&dir, &cases, &out);
        let (shape, reference) = read_f32(&cases, "logits");
        let mask = WeightFiles::open_file(&cases)
            .unwrap()
            .get("attention_mask")
            .unwrap()
            .to_i64()
            .unwrap();
        let v = shape[2];
        let mut worst = 0f32;
        for (pos, _) in mask.iter().enumerate().filter(|(_, m)| **m == 1) {
            for k in 0..v {
                worst = worst.max((ours[pos * v + k] - reference[pos * v + k]).abs());
            }
        }
        assert!(worst <= 1e-4, "{name}: max |Δ| {worst}");
    }
}

/// A batch of two rows, the second right-padded.
fn sample_cases(path: &Path, vocab: i64) {
    let t = 12;
    let ids: Vec<i64> = (0..2 * t).map(|i| (i * 37 + 5) % vocab).collect();
    let mut mask = vec![1i64; 2 * t as usize];
    for m in &mut mask[(t as usize + 7)..] {
        *m = 0;
    }
    write_cases(path, &ids, &mask, [2, t as usize]);
}

#[test]
fn made_models_survive_save_and_load_with_identical_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = tmp.path().join("cases.safetensors");
    sample_cases(&cases, 300);
    let variants: [&[&str]; 4] = [
        &[],
        &["--model-type", "qwen2", "--tie-embeddings"],
        &["--model-type", "mistral", "--kv-heads", "1"],
        &["--dtype", "bf16", "--heads", "2", "--kv-heads", "2"],
    ];
    for (i, extra) in variants.iter().enumerate() {
        let base = tmp.path().join(format!("m{i}"));
        let mut args = vec!["init-model", "--out", s(&base), "--seed", "7"];
        args.extend_from_slice(extra);
        ok(&args);
        assert!(base.join("tokenizer.json").is_file());
        let original = logits(&base, &cases, &tmp.path().join(format!("a{i}.safetensors")));

        // Sharded: small shards, an index, `{"format": "pt"}` in every file.
        let sharded = tmp.path().join(format!("sharded{i}"));
        ok(&[
            "convert",
            "--model",
            s(&base),
            "--out",
            s(&sharded),
            "--max-shard-size",
            "60KB",
        ]);
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let shards: std::collections::BTreeSet<&str> = index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            shards.len() >= 2,
            "{extra:?}: expected several shards, got {shards:?}"
        );
        assert!(!sharded.join("model.safetensors").exists());
        for shard in &shards {
            let bytes = std::fs::read(sharded.join(shard)).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        }
        let again = logits(
            &sharded,
            &cases,
            &tmp.path().join(format!("b{i}.safetensors")),
        );
        assert_eq!(
            original, again,
            "{extra:?}: sharded reload changed the logits"
        );

        // And back to one file.
        let single = tmp.path().join(format!("single{i}"));
        ok(&["convert", "--model", s(&sharded), "--out", s(&single)]);
        assert!(single.join("model.safetensors").is_file());
        assert!(single.join("tokenizer.json").is_file());
        let third = logits(
            &single,
            &cases,
            &tmp.path().join(format!("c{i}.safetensors")),
        );
        assert_eq!(
            original, third,
            "{extra:?}: single-file reload changed the logits"
        );
    }
}

#[test]
fn bf16_fixture_round_trips_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixture("tiny-llama-bf16");
    let cases = dir.join("cases.safetensors");
    // A slow tokenizer's own files travel too (a SentencePiece model is binary).
    let with_slow = tmp.path().join("with-slow");
    copy_dir(&dir, &with_slow);
    let spm = [0x0a_u8, 0x00, 0xff, 0x80];
    std::fs::write(with_slow.join("tokenizer.model"), spm).unwrap();
    std::fs::write(with_slow.join("merges.txt"), "#version: 0.2\n").unwrap();
    let out = tmp.path().join("copy");
    ok(&["convert", "--model", s(&with_slow), "--out", s(&out)]);
    assert_eq!(std::fs::read(out.join("tokenizer.model")).unwrap(), spm);
    assert!(out.join("merges.txt").is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    let size = std::fs::metadata(out.join("model.safetensors"))
        .unwrap()
        .len();
    let original = std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(
        size <= original + 1024,
        "weights should stay bf16 on disk: {size} vs {original}"
    );
    let a = logits(&dir, &cases, &tmp.path().join("a.safetensors"));
    let b = logits(&out, &cases, &tmp.path().join("b.safetensors"));
    assert_eq!(a, b);
}

#[test]
fn init_model_is_deterministic_in_its_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| tmp.path().join(n)).collect();
    ok(&["init-model", "--out", s(&paths[0]), "--seed", "1"]);
    ok(&["init-model", "--out", s(&paths[1]), "--seed", "1"]);
    ok(&["init-model", "--out", s(&paths[2]), "--seed", "2"]);
    let read = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert_eq!(read(&paths[0]), read(&paths[1]));
    assert_ne!(read(&paths[0]), read(&paths[2]));
    fails(
        &["init-model", "--out", s(&paths[0])],
        &["already holds a model"],
    );
}

#[test]
fn init_model_vocab_size_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model), "--vocab-size", "8192"]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 8192);
    let tokenizer = data::tokenizer::load(&model).unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), 8192);
    let weights = WeightFiles::open_dir(&model).unwrap();
    let shape = |name: &str| weights.get(name).unwrap().shape.to_vec();
    assert_eq!(shape("model.embed_tokens.weight"), vec![8192, 64]);
    assert_eq!(shape("lm_head.weight"), vec![8192, 64]);
    fails(
        &[
            "init-model",
            "--out",
            s(&tmp.path().join("small")),
            "--vocab-size",
            "100",
        ],
        &["vocabulary size 100"],
    );
    assert!(!tmp.path().join("small").exists());
}

/// A copy of the f32 fixture whose config.json has `edit` applied.
fn edited_fixture(tmp: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = tmp.join(name);
    copy_dir(&fixture("tiny-llama-f32"), &dir);
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    dir
}

#[test]
fn bad_checkpoints_fail_with_one_line_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = fixture("tiny-llama-f32").join("cases.safetensors");
    let out = tmp.path().join("out.safetensors");
    let run = |model: &Path, needles: &[&str]| {
        fails(
            &[
                "logits",
                "--model",
                s(model),
                "--input",
                s(&cases),
                "--out",
                s(&out),
            ],
            needles,
        )
    };

    // Missing directory.
    run(&tmp.path().join("no-such-model"), &["no-such-model"]);

    // Truncated safetensors.
    let truncated = tmp.path().join("truncated");
    copy_dir(&fixture("tiny-llama-f32"), &truncated);
    let weights = truncated.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    run(&truncated, &["model.safetensors", "truncated"]);
    // Truncated inside the header, too.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(40)
        .unwrap();
    run(&truncated, &["model.safetensors", "truncated"]);

    // Shape mismatch: the config promises a wider MLP than the weights hold.
    let wide = edited_fixture(tmp.path(), "wide", |c| c["intermediate_size"] = 180.into());
    run(
        &wide,
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[176, 64]",
            "[180, 64]",
            "model.safetensors",
        ],
    );

    // Missing and unexpected tensors: the layer count disagrees with the weights.
    let deep = edited_fixture(tmp.path(), "deep", |c| c["num_hidden_layers"] = 3.into());
    run(
        &deep,
        &["missing tensor", "model.layers.2.", "model.safetensors"],
    );
    let shallow = edited_fixture(tmp.path(), "shallow", |c| c["num_hidden_layers"] = 1.into());
    run(
        &shallow,
        &["unexpected tensor", "model.layers.1.", "model.safetensors"],
    );

    // Unknown model_type, and a config key that changes the math.
    let gemma = edited_fixture(tmp.path(), "gemma", |c| c["model_type"] = "gemma".into());
    run(&gemma, &["config.json", "model_type `gemma`"]);
    let yarn =
        edited_fixture(
            tmp.path(),
            "yarn",
            |c| {
                c["rope_parameters"] =
                    serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
            },
        );
    run(&yarn, &["config.json", "rope_parameters.rope_type", "yarn"]);
    let gelu = edited_fixture(tmp.path(), "gelu", |c| c["hidden_act"] = "gelu".into());
    run(&gelu, &["config.json", "hidden_act"]);

    // Malformed config.json.
    let broken = tmp.path().join("broken");
    copy_dir(&fixture("tiny-llama-f32"), &broken);
    std::fs::write(broken.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    run(&broken, &["config.json", "invalid JSON"]);

    // An index naming a shard that is not there.
    let sharded = tmp.path().join("sharded");
    ok(&[
        "convert",
        "--model",
        s(&fixture("tiny-llama-f32")),
        "--out",
        s(&sharded),
        "--max-shard-size",
        "100KB",
    ]);
    std::fs::remove_file(sharded.join("model-00002-of-00006.safetensors")).unwrap();
    run(
        &sharded,
        &[
            "model.safetensors.index.json",
            "model-00002-of-00006.safetensors",
        ],
    );

    // No weights at all.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(
        fixture("tiny-llama-f32").join("config.json"),
        empty.join("config.json"),
    )
    .unwrap();
    run(&empty, &["no weights found"]);
}

#[test]
fn bad_logits_inputs_fail_with_one_line_naming_the_culprit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("tiny-llama-f32");
    let out = tmp.path().join("out.safetensors");
    let run = |input: &Path, needles: &[&str]| {
        fails(
            &[
                "logits",
                "--model",
                s(&model),
                "--input",
                s(input),
                "--out",
                s(&out),
            ],
            needles,
        )
    };
    run(
        &tmp.path().join("absent.safetensors"),
        &["absent.safetensors"],
    );

    let no_ids = tmp.path().join("no_ids.safetensors");
    let only_mask = BTreeMap::from([(
        "attention_mask".to_string(),
        OwnedTensor::from_i64(&[1, 1], vec![1, 2]),
    )]);
    checkpoints::write_safetensors(&no_ids, &only_mask).unwrap();
    run(&no_ids, &["no_ids.safetensors", "input_ids"]);

    let float_ids = tmp.path().join("float_ids.safetensors");
    let floats = BTreeMap::from([(
        "input_ids".to_string(),
        OwnedTensor::from_f32(&[1.0, 2.0], vec![1, 2], checkpoints::WeightDtype::F32),
    )]);
    checkpoints::write_safetensors(&float_ids, &floats).unwrap();
    run(
        &float_ids,
        &["float_ids.safetensors", "input_ids", "I64 or I32"],
    );

    let out_of_vocab = tmp.path().join("oov.safetensors");
    write_cases(&out_of_vocab, &[1, 2, 384], &[1, 1, 1], [1, 3]);
    run(
        &out_of_vocab,
        &["oov.safetensors", "row 0, column 2", "384"],
    );

    let bad_mask = tmp.path().join("mask.safetensors");
    write_cases(&bad_mask, &[1, 2, 3], &[1, 2, 1], [1, 3]);
    run(&bad_mask, &["mask.safetensors", "attention_mask", "0 or 1"]);

    let garbage = tmp.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    run(
        &garbage,
        &["garbage.safetensors", "not a valid safetensors file"],
    );

    assert!(!out.exists(), "no output may be written on bad input");
}

#[test]
fn usage_errors_are_one_line() {
    let out = hearth(&["logits", "--model", "x"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--input"), "{stderr}");
}

/// A row too long for its attention mask to fit is refused before the model loads, not
/// as an allocation that aborts the process.
#[test]
fn logits_refuses_rows_whose_attention_mask_cannot_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model)]);
    let cases = tmp.path().join("huge.safetensors");
    let t = 200_000;
    write_cases(&cases, &vec![0; t], &vec![1; t], [1, t]);
    fails(
        &[
            "logits",
            "--model",
            s(&model),
            "--input",
            s(&cases),
            "--out",
            s(&tmp.path().join("o.safetensors")),
        ],
        &[
            "huge.safetensors",
            "200000 tokens need a 200000×200000 attention mask",
        ],
    );
}

/// A checkpoint holding a NaN weight is refused when loaded, naming the file and tensor,
/// instead of answering NaN logits and empty replies.
#[test]
fn a_checkpoint_with_nan_weights_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model), "--dtype", "f32"]);
    let weights = model.join("model.safetensors");
    let files = WeightFiles::open_file(&weights).unwrap();
    let names: Vec<String> = files.names().map(str::to_string).collect();
    let mut tensors = BTreeMap::new();
    for name in names {
        let (shape, mut values) = read_f32(&weights, &name);
        if name == "model.norm.weight" {
            values[3] = f32::NAN;
        }
        tensors.insert(
            name,
            OwnedTensor::from_f32(&values, shape, WeightDtype::F32),
        );
    }
    drop(files);
    checkpoints::write_safetensors(&weights, &tensors).unwrap();
    let needles = ["model.norm.weight", "holds NaN at index 3", "broken"];
    fails(
        &[
            "logits",
            "--model",
            s(&model),
            "--text",
            "hi",
            "--out",
            s(&tmp.path().join("o.safetensors")),
        ],
        &needles,
    );
    fails(
        &["generate", "--model", s(&model), "--prompt", "hi"],
        &needles,
    );
}

/// A pipe or a device where a config, tokenizer or recipe belongs is refused at once,
/// never waited on or read until memory runs out.
#[test]
fn pipes_and_devices_are_no_configs_tokenizers_or_recipes() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = |name: &str| {
        let path = tmp.path().join(name);
        let c = std::ffi::CString::new(s(&path)).unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        path
    };
    // A recipe from a pipe is read (`<(sed …)`); an endless device is cut off at its limit.
    let recipe = fifo("r.toml");
    let writer = {
        let recipe = recipe.clone();
        std::thread::spawn(move || std::fs::write(recipe, "[model\n").unwrap())
    };
    fails(&["train", s(&recipe)], &["r.toml", "line 1"]);
    writer.join().unwrap();
    fails(&["train", "/dev/zero"], &["/dev/zero", "larger than"]);
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model)]);
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let c = std::ffi::CString::new(s(&model.join("tokenizer.json"))).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    fails(
        &["generate", "--model", s(&model), "--prompt", "hi"],
        &["tokenizer.json", "not a regular file"],
    );
}

#[test]
fn text_input_pads_without_changing_any_row() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model), "--seed", "3"]);
    let short = "Client: I feel tired.";
    let long = "Counselor: Thank you for telling me. What has been weighing on you lately?";
    let both = tmp.path().join("both.safetensors");
    ok(&[
        "logits",
        "--model",
        s(&model),
        "--text",
        long,
        "--text",
        short,
        "--out",
        s(&both),
    ]);
    let alone = tmp.path().join("alone.safetensors");
    ok(&[
        "logits",
        "--model",
        s(&model),
        "--text",
        short,
        "--out",
        s(&alone),
    ]);

    let (shape, batch_logits) = read_f32(&both, "logits");
    let (alone_shape, alone_logits) = read_f32(&alone, "logits");
    let (t, v, n) = (shape[1], shape[2], alone_shape[1]);
    assert!(n < t, "the short text must be padded in the batch");
    let files = WeightFiles::open_file(&both).unwrap();
    let mask = files.get("attention_mask").unwrap().to_i64().unwrap();
    assert_eq!(mask[t..].iter().sum::<i64>() as usize, n);
    let row = &batch_logits[t * v..t * v + n * v];
    let worst = row
        .iter()
        .zip(&alone_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "padding changed the short row's logits by {worst}"
    );

    // The written ids reproduce the logits when fed back as --input.
    let again = tmp.path().join("again.safetensors");
    assert_eq!(logits(&model, &both, &again), batch_logits);
}

#[test]
fn data_render_matches_the_template_fixture_and_refuses_bad_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/chat-template/llama3");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let input = tmp.path().join("in.jsonl");
    let lines: String = cases
        .iter()
        .map(|c| format!("{}\n", serde_json::json!({"messages": c["messages"]})))
        .collect();
    std::fs::write(&input, lines).unwrap();
    let out = tmp.path().join("out.jsonl");
    ok(&[
        "data",
        "render",
        "--tokenizer",
        s(&dir),
        "--input",
        s(&input),
        "--out",
        s(&out),
    ]);
    let rendered = jsonl(&out);
    assert_eq!(rendered.len(), cases.len());
    for (got, want) in rendered.iter().zip(&cases) {
        assert_eq!(got["input_ids"], want["input_ids"]);
        // Under transformers' and TRL's key; the fixture calls it `assistant_mask`.
        assert_eq!(got["assistant_masks"], want["assistant_mask"]);
    }

    // A bad line fails the whole render, names the line, and leaves no output behind.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"no reply\"}}]}}\n",
            serde_json::json!({"messages": cases[0]["messages"]})
        ),
    )
    .unwrap();
    let out2 = tmp.path().join("out2.jsonl");
    fails(
        &[
            "data",
            "render",
            "--tokenizer",
            s(&dir),
            "--input",
            s(&bad),
            "--out",
            s(&out2),
        ],
        &["bad.jsonl", "line 2", "no assistant tokens"],
    );
    assert!(!out2.exists());
    let temporary: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .map(|e| e.file_name())
        .collect();
    assert!(temporary.is_empty(), "left behind: {temporary:?}");

    // A tokenizer directory with no template says how to pick a built-in one.
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model)]);
    std::fs::remove_file(model.join("tokenizer_config.json")).unwrap();
    fails(
        &[
            "data",
            "render",
            "--tokenizer",
            s(&model),
            "--input",
            s(&input),
            "--out",
            s(&out2),
        ],
        &["no chat template", "(llama3 or chatml) with --template"],
    );
    // A tokenizer directory that is not there is named as missing, not as templateless.
    fails(
        &[
            "data",
            "render",
            "--tokenizer",
            s(&tmp.path().join("nope")),
            "--input",
            s(&input),
            "--out",
            s(&out2),
        ],
        &["nope", "No such file or directory"],
    );
    // With a built-in template, a tokenizer_config.json that does not parse is named, not
    // read as none (the render lost its BOS).
    let broken = tmp.path().join("broken");
    copy_dir(&model, &broken);
    std::fs::write(broken.join("tokenizer_config.json"), "{\"bos_token\": ").unwrap();
    fails(
        &[
            "data",
            "render",
            "--tokenizer",
            s(&broken),
            "--template",
            "llama3",
            "--input",
            s(&input),
            "--out",
            s(&out2),
        ],
        &["tokenizer_config.json", "invalid JSON"],
    );
    ok(&[
        "data",
        "render",
        "--tokenizer",
        s(&model),
        "--template",
        "llama3",
        "--input",
        s(&input),
        "--out",
        s(&out2),
    ]);
}

#[test]
fn data_generate_and_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model)]);
    let pairs = tmp.path().join("pairs.jsonl");
    ok(&[
        "data",
        "generate",
        "--kind",
        "preference",
        "--rows",
        "30",
        "--seed",
        "4",
        "--out",
        s(&pairs),
    ]);
    assert_eq!(std::fs::read_to_string(&pairs).unwrap().lines().count(), 30);

    let inspect = |extra: &[&str]| {
        let mut args = vec!["data", "inspect", s(&pairs), "--tokenizer", s(&model)];
        args.extend_from_slice(extra);
        let out = hearth(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let report = inspect(&["--max-length", "40"]);
    assert!(report.contains("format: preference"), "{report}");
    assert!(report.contains("examples: 30"), "{report}");
    assert!(report.contains("histogram:"), "{report}");
    assert!(report.contains("truncated"), "{report}");
    // No sample text unless asked.
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&pairs)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let prompt = first["prompt"].as_str().unwrap();
    assert!(
        !report.contains(prompt),
        "inspect printed sample text without --show-example"
    );
    let shown = inspect(&["--show-example", "--max-length", "1000"]);
    assert!(shown.contains(prompt) && shown.contains('⟦'), "{shown}");
    // Both sides of the pair, each with its completion marked.
    let side = |key: &str| match &first[key] {
        serde_json::Value::String(s) => s.clone(),
        other => other[0]["content"].as_str().unwrap().to_string(),
    };
    let (chosen, rejected) = (side("chosen"), side("rejected"));
    let at = |needle: &str| {
        shown
            .find(needle)
            .unwrap_or_else(|| panic!("{needle}: {shown}"))
    };
    assert!(
        at("chosen:") < at(&chosen) && at(&chosen) < at("rejected:"),
        "{shown}"
    );
    assert!(at("rejected:") < at(&rejected), "{shown}");
    // The made model ships its template: the bos token is rendered.
    assert!(shown.contains("<|begin_of_text|>"), "{shown}");

    // A value outside a flag's choices is a usage error (exit 2), listing them.
    let out = hearth(&[
        "data",
        "inspect",
        s(&pairs),
        "--tokenizer",
        s(&model),
        "--truncation",
        "middle",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("invalid value 'middle' for '--truncation")
            && stderr.contains("keep_start, keep_end, drop"),
        "{stderr}"
    );
    fails(
        &[
            "data",
            "inspect",
            s(&pairs),
            "--tokenizer",
            s(&model),
            "--format",
            "cactus",
        ],
        &["pairs.jsonl", "line 1", "column `dialogue`", "missing"],
    );
}

#[test]
fn data_inspect_reads_a_recipe_and_rejects_unknown_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model)]);
    let cactus = tmp.path().join("cactus.json");
    let rows = serde_json::json!([
        {"dialogue": "Counselor: Hi.\nClient (sighs): Hard week.\nCounselor: What made it hard?", "cbt_plan": "p"},
        {"dialogue": "Counselor: Welcome.\nClient: Thanks.\nCounselor: How are you?", "cbt_plan": "q"}
    ]);
    std::fs::write(&cactus, rows.to_string()).unwrap();
    let recipe = tmp.path().join("r.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n\n[data]\ntrain = {:?}\nformat = \"cactus\"\n",
            s(&model),
            s(&cactus)
        ),
    )
    .unwrap();
    let out = hearth(&["data", "inspect", s(&recipe)]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("format: cactus") && stdout.contains("examples: 2"),
        "{stdout}"
    );

    std::fs::write(
        &recipe,
        format!(
            "[model]\npath = {:?}\n\n[data]\ntrain = {:?}\nmax_lenght = 5\n",
            s(&model),
            s(&cactus)
        ),
    )
    .unwrap();
    fails(
        &["data", "inspect", s(&recipe)],
        &["r.toml", "line 6", "max_lenght", "max_length"],
    );
}

#[test]
fn without_a_terminal_progress_is_plain_lines_and_every_step_logs_its_time() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("run");
    let args = TinyRun::sft(&base)
        .sets(&["train.max_steps=3", "train.progress_seconds=0"])
        .out(&run);
    let out = hearth(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // stderr is a pipe here, so the bar is silent and each step prints its line.
    let progress: Vec<&str> = stderr.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(progress.len(), 3, "{stderr}");
    for (k, line) in progress.iter().enumerate() {
        assert!(
            line.starts_with(&format!("step {}/3 loss ", k + 1)),
            "{line}"
        );
        assert!(
            line.contains(" tok/s ") && line.ends_with(" s/step"),
            "{line}"
        );
    }
    // Each step line: its wall time, and its own tokens over it.
    let train: Vec<serde_json::Value> = metric_lines(&run)
        .into_iter()
        .filter(|l| l.get("loss").is_some())
        .collect();
    assert_eq!(train.len(), 3);
    let mut before = 0.0;
    for l in &train {
        let time = l["step_time"].as_f64().expect("step_time logged");
        let tps = l["train_tokens_per_second"]
            .as_f64()
            .expect("tokens/s logged");
        let tokens = l["num_tokens"].as_f64().unwrap() - before;
        before = l["num_tokens"].as_f64().unwrap();
        assert!(time > 0.0 && tokens > 0.0, "{l}");
        assert!((tps * time - tokens).abs() < 1e-6 * tokens, "{l}");
    }

    // The final evaluation reports its batches, ending at all of them.
    let eval: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("eval batches "))
        .collect();
    let last = eval
        .last()
        .unwrap_or_else(|| panic!("no eval progress: {stderr}"));
    let (done, planned) = last
        .trim_start_matches("eval batches ")
        .split_once(' ')
        .and_then(|(n, _)| n.split_once('/'))
        .unwrap();
    assert!(done == planned && last.ends_with("(step 3/3)"), "{last}");

    // GRPO's rollout reports completions done out of planned, and sessions theirs.
    for (recipe, data, what, planned) in [
        (
            "tiny-grpo.toml",
            "counseling-prompts.jsonl",
            "completions",
            32,
        ),
        (
            "tiny-session-grpo.toml",
            "counseling-sessions.jsonl",
            "sessions",
            16,
        ),
    ] {
        let run = tmp.path().join(recipe);
        let args = TinyRun::of(recipe, data, &base)
            .sets(&[
                "train.max_steps=1",
                "train.progress_seconds=0",
                "grpo.max_completion_length=8",
            ])
            .out(&run);
        let out = hearth(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let counts: Vec<usize> = stderr
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{what} ")))
            .map(|l| {
                assert!(l.ends_with(&format!("/{planned} (step 1/1)")), "{l}");
                l.split('/').next().unwrap().parse().unwrap()
            })
            .collect();
        assert!(counts.len() >= 2, "{recipe}: {stderr}");
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
        assert_eq!(counts.last(), Some(&planned), "{recipe}: {stderr}");
    }

    // With the default interval a short run prints no line: errors stay one line.
    let quiet = tmp.path().join("quiet");
    let out = hearth(&TinyRun::sft(&base).sets(&["train.max_steps=2"]).out(&quiet));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().count() == 1 && stderr.starts_with("trained 2 steps"),
        "only the closing line: {stderr}"
    );
}

#[test]
fn train_tiny_sft_recipe_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/tiny-sft.toml");
    let base = tmp.path().join("base");
    let run = tmp.path().join("run");
    let sft = TinyRun::sft(&base);
    ok(&sft.out(&run));

    // metrics.jsonl with TRL's names; the assistant-token loss falls clearly.
    let lines = metric_lines(&run);
    let train: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    for key in [
        "loss",
        "learning_rate",
        "grad_norm",
        "mean_token_accuracy",
        "entropy",
        "num_tokens",
        "epoch",
        "step",
    ] {
        assert!(
            train[0].get(key).is_some(),
            "metrics lack `{key}`: {}",
            train[0]
        );
    }
    assert!(
        lines.iter().any(|l| l.get("eval_loss").is_some()),
        "no eval_loss logged"
    );
    let losses: Vec<f64> = train.iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    let first = losses[0];
    let last_five = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    // Measured: ln(512) ≈ 6.26 at step 1 (a random model) to about 5.45 by step 48.
    assert!((first - (512f64).ln()).abs() < 0.05, "first loss {first}");
    assert!(
        last_five < first - 0.6,
        "loss did not fall clearly: {first} -> {last_five}"
    );
    assert_eq!(train.len(), 48, "6 epochs of 8 batches");

    // Run directory layout: resolved recipe, curve, the last two checkpoints, final adapter.
    assert!(
        std::fs::read_to_string(run.join("recipe.toml"))
            .unwrap()
            .contains("learning_rate = 0.01")
    );
    assert!(
        std::fs::read_to_string(run.join("loss.svg"))
            .unwrap()
            .contains("<polyline")
    );
    let mut checkpoints: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    checkpoints.sort();
    assert_eq!(checkpoints, vec!["checkpoint-30", "checkpoint-40"]);
    assert!(!run.join(".tmp-final").exists());
    let adapter = run.join("final");
    assert!(
        adapter.join("adapter_model.safetensors").is_file()
            && adapter.join("adapter_config.json").is_file()
    );

    // base + adapter and the merged checkpoint give the same logits; both differ from base.
    let text = "Client: I keep worrying about work.";
    let at = |name: &str| tmp.path().join(name);
    let a = logits_of_text(&base, Some(&adapter), text, &at("a.safetensors"));
    let merged = tmp.path().join("merged");
    ok(&[
        "merge",
        "--base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ]);
    assert!(merged.join("tokenizer.json").is_file());
    let m = logits_of_text(&merged, None, text, &at("m.safetensors"));
    let p = logits_of_text(&base, None, text, &at("p.safetensors"));
    assert!(
        max_abs_diff(&a, &m) < 1e-4,
        "merged differs from base + adapter by {}",
        max_abs_diff(&a, &m)
    );
    assert!(max_abs_diff(&a, &p) > 1e-2, "training changed nothing");

    // A second run into the same directory is refused; unknown keys name the nearest one.
    fails(&sft.out(&run), &["already holds a run"]);
    fails(
        &[
            "train",
            s(&recipe),
            "--out",
            s(&tmp.path().join("r2")),
            "--set",
            "train.lerning_rate=1",
        ],
        &[
            "tiny-sft.toml",
            "`lerning_rate`",
            "did you mean `learning_rate`",
        ],
    );
}

/// An adapter on a tied model's embeddings leaves its head alone (the adapter acts on
/// lookups): merged, and exported to GGUF, the model gets a head of its own and gives the
/// adapter model's logits, not a head moved by the embeddings' update.
#[test]
fn merging_adapted_tied_embeddings_keeps_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    ok(&["init-model", "--out", s(&base), "--tie-embeddings"]);
    let run = tmp.path().join("run");
    ok(&TinyRun::sft(&base)
        .sets(&[
            "train.max_steps=4",
            "train.eval_steps=0",
            "train.save_steps=0",
            "lora.targets=[\"q_proj\", \"embed_tokens\"]",
        ])
        .out(&run));
    let adapter = run.join("final");
    let text = "Client: I keep worrying about work.";
    let logits = |model: &Path, adapter: Option<&Path>, name: &str| {
        logits_of_text(model, adapter, text, &tmp.path().join(name))
    };
    let with_adapter = logits(&base, Some(&adapter), "a.safetensors");
    let plain = logits(&base, None, "p.safetensors");
    let merged = tmp.path().join("merged");
    ok(&[
        "merge",
        "--base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ]);
    let config = std::fs::read_to_string(merged.join("config.json")).unwrap();
    assert!(
        config.contains("\"tie_word_embeddings\": false"),
        "{config}"
    );
    let from_merged = logits(&merged, None, "m.safetensors");
    let gguf_dir = tmp.path().join("gguf");
    std::fs::create_dir(&gguf_dir).unwrap();
    ok(&[
        "export",
        "gguf",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--type",
        "f32",
        "--out",
        s(&gguf_dir.join("m.gguf")),
    ]);
    let from_gguf = logits(&gguf_dir, None, "g.safetensors");
    assert!(
        max_abs_diff(&with_adapter, &plain) > 1e-3,
        "training changed nothing"
    );
    for (name, got) in [("merged", &from_merged), ("gguf", &from_gguf)] {
        let d = max_abs_diff(&with_adapter, got);
        assert!(d < 1e-4, "{name} differs from base + adapter by {d}");
    }
}

/// Training lines of metrics.jsonl (eval and summary lines aside), as text, without their
/// wall-clock timings.
fn loss_lines(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for key in trainer::train::TIMING_KEYS {
                v.as_object_mut().unwrap().remove(key);
            }
            v.to_string()
        })
        .collect()
}

#[test]
fn sigkilled_runs_resume_to_identical_weights_and_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let extra = [
        "train.max_steps=24",
        "train.save_steps=4",
        "train.save_total_limit=3",
        // Dropout draws from the device RNG: resume must reproduce them too.
        "lora.dropout=0.1",
        // Lines average 3 steps: checkpoints 4, 8 … fall inside a window, which a resume
        // must carry on.
        "train.logging_steps=3",
    ];
    let run_a = tmp.path().join("a");
    let args = TinyRun::sft(&base).sets(&extra).out(&run_a);
    ok(&args);

    let run_b = tmp.path().join("b");
    let start = TinyRun::sft(&base).sets(&extra).out(&run_b);
    let resume = TinyRun::sft(&base).sets(&extra).resume(&run_b);
    let mut kills = 0;
    for (args, wait_for) in [(&start, "checkpoint-8"), (&resume, "checkpoint-16")] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !run_b.join(wait_for).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        assert!(!run_b.join("final").exists() || kills == 0);
    }
    assert!(kills >= 1, "the run finished before it could be killed");
    let args: Vec<&str> = resume.iter().map(String::as_str).collect();
    ok(&args);

    let read = |run: &Path| std::fs::read(run.join("final/adapter_model.safetensors")).unwrap();
    assert!(
        read(&run_a) == read(&run_b),
        "resumed weights differ from the uninterrupted run"
    );
    assert_eq!(loss_lines(&run_a), loss_lines(&run_b));
    assert_eq!(loss_lines(&run_b).len(), 8);
}

/// Prompts that, with the new tokens, run past the model's context are answered with a
/// warning that counts and places them without quoting them.
#[test]
fn generate_warns_of_prompts_past_the_context() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model)]);
    let config = model.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["max_position_embeddings"] = 48.into();
    std::fs::write(&config, c.to_string()).unwrap();
    let long = "my partner and I keep arguing about money ".repeat(8);
    let prompts = tmp.path().join("prompts.jsonl");
    let rows: String = ["Hi.", long.as_str(), "Hello."]
        .iter()
        .map(|a| format!("{}\n", serde_json::json!({ "prompt": a })))
        .collect();
    std::fs::write(&prompts, rows).unwrap();
    let out = tmp.path().join("replies.jsonl");
    let gen_args = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", s(&model), "--max-new-tokens", "4"];
        args.extend_from_slice(extra);
        hearth(&args)
    };
    let file = gen_args(&["--input", s(&prompts), "--out", s(&out)]);
    let stderr = String::from_utf8_lossy(&file.stderr);
    assert!(file.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: 1 of 3 prompts (the first is prompt 2, ")
            && stderr.contains("--max-new-tokens 4 runs past the model's context")
            && stderr.contains("max_position_embeddings 48"),
        "{stderr}"
    );
    assert!(!stderr.contains("arguing"), "prompt text in: {stderr}");
    assert_eq!(jsonl(&out).len(), 3);
    let one = gen_args(&["--prompt", &long]);
    let stderr = String::from_utf8_lossy(&one.stderr);
    assert!(
        one.status.success() && stderr.contains("warning: the conversation ("),
        "{stderr}"
    );
    let short = gen_args(&["--prompt", "Hi."]);
    assert!(
        short.status.success() && !String::from_utf8_lossy(&short.stderr).contains("warning"),
        "{}",
        String::from_utf8_lossy(&short.stderr)
    );
    fails(
        &[
            "generate",
            "--model",
            s(&model),
            "--prompt",
            "Hi.",
            "--batch-size",
            "0",
        ],
        &["--batch-size must be at least 1"],
    );
}

#[test]
fn generate_answers_a_prompt_file_in_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model), "--init-std", "0.3"]);
    let prompts = tmp.path().join("prompts.jsonl");
    let asks = [
        "I feel tired.",
        "Work has been hard lately and I cannot sleep.",
        "Hello.",
        "My sister and I argue every day.",
        "What can I do about worry?",
    ];
    let rows: String = asks
        .iter()
        .map(|a| format!("{}\n", serde_json::json!({ "prompt": a })))
        .collect();
    std::fs::write(&prompts, rows).unwrap();
    let answer = |batch: &str, out: &Path| {
        let got = hearth(&[
            "generate",
            "--model",
            s(&model),
            "--input",
            s(&prompts),
            "--out",
            s(out),
            "--batch-size",
            batch,
            "--max-new-tokens",
            "6",
        ]);
        let stderr = String::from_utf8_lossy(&got.stderr).into_owned();
        assert!(got.status.success(), "{stderr}");
        assert!(got.stdout.is_empty(), "replies go to --out only");
        (jsonl(out), stderr)
    };
    let (lines, stderr) = answer("2", &tmp.path().join("b2.jsonl"));
    assert!(
        stderr.contains("answered 5 prompts") && stderr.contains("tokens/s"),
        "{stderr}"
    );
    assert_eq!(lines.len(), 5);
    let mut total = 0;
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["index"], i);
        let n = l["tokens"].as_u64().unwrap();
        assert!(
            n <= 6 && l["reply"].is_string() && l["stopped"].is_boolean(),
            "{l}"
        );
        total += n;
    }
    assert!(stderr.contains(&format!("with {total} tokens")), "{stderr}");
    // The same batches again give the same bytes.
    let (again, _) = answer("2", &tmp.path().join("b2-again.jsonl"));
    assert_eq!(again, lines);
    // One prompt per batch decodes exactly as `--prompt` does.
    let (single, _) = answer("1", &tmp.path().join("b1.jsonl"));
    let one = hearth(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        asks[1],
        "--max-new-tokens",
        "6",
    ]);
    assert_eq!(
        String::from_utf8(one.stdout)
            .unwrap()
            .trim_end_matches('\n'),
        single[1]["reply"].as_str().unwrap()
    );

    // A row with nothing to answer names its line; nothing is written.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"messages\": [{\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .unwrap();
    let out = tmp.path().join("never.jsonl");
    fails(
        &[
            "generate",
            "--model",
            s(&model),
            "--input",
            s(&bad),
            "--out",
            s(&out),
        ],
        &["bad.jsonl", "line 2", "nothing to answer"],
    );
    assert!(!out.exists());

    // Several sampled replies per row: each row's lines in order, numbered; a seed repeats
    // them, whatever the batch size, and the replies to one row are not all the same.
    let sampled = |out: &Path, batch: &str| {
        let got = hearth(&[
            "generate",
            "--model",
            s(&model),
            "--input",
            s(&prompts),
            "--out",
            s(out),
            "--batch-size",
            batch,
            "--samples",
            "3",
            "--temperature",
            "1.0",
            "--seed",
            "4",
            "--max-new-tokens",
            "8",
        ]);
        let stderr = String::from_utf8_lossy(&got.stderr).into_owned();
        assert!(got.status.success(), "{stderr}");
        assert!(
            stderr.contains("answered 5 prompts 3 times each"),
            "{stderr}"
        );
        jsonl(out)
    };
    let lines = sampled(&tmp.path().join("s3.jsonl"), "2");
    assert_eq!(lines.len(), 15);
    for (n, l) in lines.iter().enumerate() {
        assert_eq!(
            (l["index"].as_u64(), l["sample"].as_u64()),
            (Some(n as u64 / 3), Some(n as u64 % 3))
        );
    }
    assert_eq!(sampled(&tmp.path().join("s3-again.jsonl"), "2"), lines);
    assert_eq!(sampled(&tmp.path().join("s3-b1.jsonl"), "1"), lines);
    assert_eq!(sampled(&tmp.path().join("s3-b5.jsonl"), "5"), lines);
    // The first row's first sample draws from the seed's own stream, as `--prompt` does.
    let first = hearth(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        asks[0],
        "--temperature",
        "1.0",
        "--seed",
        "4",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(
        String::from_utf8(first.stdout)
            .unwrap()
            .trim_end_matches('\n'),
        lines[0]["reply"].as_str().unwrap()
    );
    let replies: std::collections::HashSet<_> =
        lines.iter().map(|l| l["reply"].to_string()).collect();
    assert!(
        replies.len() > 5,
        "sampling gave {} distinct replies of 15",
        replies.len()
    );
}

#[test]
fn generate_answers_a_prompt_and_a_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model), "--init-std", "0.3"]);
    let out = hearth(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "I feel tired.",
        "--max-new-tokens",
        "6",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = String::from_utf8(out.stdout).unwrap();
    let again = hearth(&[
        "generate",
        "--model",
        s(&model),
        "--prompt",
        "I feel tired.",
        "--max-new-tokens",
        "6",
    ]);
    assert_eq!(
        String::from_utf8(again.stdout).unwrap(),
        first,
        "greedy decoding is deterministic"
    );

    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args([
            "generate",
            "--model",
            s(&model),
            "--chat",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0.8",
            "--seed",
            "1",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello.\n\nHow are you?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().lines().count(),
        2,
        "one reply per message"
    );
}

/// Recomputing activations in the backward pass must not change a single loss bit. (What
/// it saves in memory is not measured here: on the tiny model the activations are too
/// small a share of the process to see.)
#[test]
fn gradient_checkpointing_leaves_the_losses_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let mut lines = Vec::new();
    for (name, flag) in [("plain", "false"), ("checkpointed", "true")] {
        let run = tmp.path().join(name);
        let gc = format!("train.gradient_checkpointing={flag}");
        let args = TinyRun::sft(&base)
            .sets(&["train.max_steps=3", &gc])
            .out(&run);
        ok(&args);
        lines.push(loss_lines(&run));
    }
    assert_eq!(lines[0].len(), 3);
    assert_eq!(lines[0], lines[1]);
}

#[test]
fn training_on_packed_rows_runs_and_learns_from_every_row() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = TinyRun::sft(&tmp.path().join("base"))
        .sets(&["data.packing=true", "train.max_steps=4"])
        .out(&run);
    ok(&args);
    let lines = loss_lines(&run);
    assert_eq!(lines.len(), 4);
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let loss = v["loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 1.0, "{line}");
    }
    // 8 packed rows of 256 tokens per step hold more real tokens than 8 padded examples.
    let tokens = |l: &str| {
        serde_json::from_str::<serde_json::Value>(l).unwrap()["num_tokens"]
            .as_u64()
            .unwrap()
    };
    assert!(
        tokens(&lines[0]) > 8 * 200,
        "packed rows are nearly full: {}",
        tokens(&lines[0])
    );
}

/// Packed rows are the same every epoch, only shuffled, so epochs are equally long: four
/// epochs of one row per step take four times the rows, and the epoch counter climbs to
/// exactly 4. Rows repacked per epoch used to differ in number, and a shorter epoch made
/// the counter underflow.
#[test]
fn packed_epochs_have_the_same_rows_and_count_epochs_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = TinyRun::sft(&tmp.path().join("base"))
        .sets(&[
            "data.packing=true",
            "train.per_device_train_batch_size=1",
            "train.max_steps=0",
            "train.num_train_epochs=4",
            "train.eval_steps=0",
        ])
        .out(&run);
    ok(&args);
    let lines: Vec<serde_json::Value> = loss_lines(&run)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() % 4, 0, "{} steps", lines.len());
    let per_epoch = lines.len() / 4;
    for (i, line) in lines.iter().enumerate() {
        let epoch = line["epoch"].as_f64().unwrap();
        let expected = (i + 1) as f64 / per_epoch as f64;
        assert!((epoch - expected).abs() < 1e-9, "step {}: {epoch}", i + 1);
    }
}

/// `merge --quantize` rebuilds the base as the QLoRA run held it, `quantize_skip` and all:
/// the shipped tiny QLoRA recipe keeps `down_proj` dense (its rows are no whole NF4
/// blocks), which merge could not be told, so it failed (or, with whole blocks, quantized
/// weights the run had trained against dense).
#[test]
fn merge_quantizes_the_base_as_the_qlora_run_did() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("qlora");
    ok(
        &TinyRun::of("tiny-qlora.toml", "counseling-sft.jsonl", &base)
            .sets(&["train.max_steps=1"])
            .out(&run),
    );
    let adapter = run.join("final");
    let merge = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["merge", "--base", s(&base), "--adapter", s(&adapter)]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend(["--out".to_string(), s(out).to_string()]);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    fails(
        &merge(&tmp.path().join("whole"), &["--quantize", "nf4"]),
        &["down_proj", "quantize_skip"],
    );
    let dense = tmp.path().join("dense");
    ok(&merge(&dense, &[]));
    let seen = tmp.path().join("seen");
    ok(&merge(
        &seen,
        &["--quantize", "nf4", "--quantize-skip", "down_proj"],
    ));
    let weight = |dir: &Path, name: &str| read_f32(&dir.join("model.safetensors"), name).1;
    let down = "model.layers.0.mlp.down_proj.weight";
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(
        weight(&seen, down),
        weight(&dense, down),
        "down_proj stayed dense"
    );
    assert_ne!(
        weight(&seen, q),
        weight(&dense, q),
        "q_proj went through NF4"
    );
    fails(
        &merge(&tmp.path().join("bare"), &["--quantize-skip", "down_proj"]),
        &["--quantize-skip", "describe --quantize"],
    );
    // A misspelt or out-of-range name would quantize what the run kept dense.
    for (skip, why) in [
        ("down-proj", "`down-proj` names no weight"),
        ("model.layers.7.mlp.down_proj", "the model has 2 layers"),
        ("model.layers.0.mlp.q_proj", "names no weight"),
    ] {
        let out = tmp.path().join("typo");
        fails(
            &merge(&out, &["--quantize", "nf4", "--quantize-skip", skip]),
            &["quantize_skip", why],
        );
        assert!(!out.exists());
    }
    fails(
        &TinyRun::of("tiny-qlora.toml", "counseling-sft.jsonl", &base)
            .sets(&["model.quantize_skip=[\"down-proj\"]"])
            .out(&tmp.path().join("typo-run")),
        &["model.quantize_skip", "`down-proj` names no weight"],
    );
    fails(
        &TinyRun::sft(&base)
            .sets(&["model.quantize_embeddings=true"])
            .out(&tmp.path().join("plain-run")),
        &["model.quantize_embeddings describe model.quantize"],
    );
}

/// A reward model trained with a recipe's built-in template carries it in `final/`, so
/// scoring renders as training did: `eval preference` on the run's own eval pairs gives
/// the run's last eval_accuracy (the base's template gave another).
#[test]
fn a_reward_model_scores_with_the_template_it_trained_with() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = tmp.path().join("base");
    let pairs = root.join("data/examples/counseling-preference.jsonl");
    let eval = tmp.path().join("eval.jsonl");
    let text = std::fs::read_to_string(&pairs).unwrap();
    std::fs::write(&eval, text.lines().take(24).collect::<Vec<_>>().join("\n")).unwrap();
    let run = tmp.path().join("rm");
    ok(&TinyRun::of("tiny-reward.toml", s(&pairs), &base)
        .sets(&[
            "train.max_steps=3",
            "data.template=\"chatml\"",
            &format!("data.eval={:?}", s(&eval)),
        ])
        .out(&run));
    let fin = run.join("final");
    assert_eq!(
        std::fs::read_to_string(fin.join("chat_template.jinja")).unwrap(),
        data::template::CHATML
    );
    // A LoRA SFT run's adapter carries it too, and generate then renders with it: the same
    // reply as with --template chatml.
    let sft = tmp.path().join("sft");
    ok(&TinyRun::sft(&base)
        .sets(&["train.max_steps=1", "data.template=\"chatml\""])
        .out(&sft));
    let adapter = sft.join("final");
    assert_eq!(
        std::fs::read_to_string(adapter.join("chat_template.jinja")).unwrap(),
        data::template::CHATML
    );
    let reply = |model: &[&str], extra: &[&str]| {
        let mut args = vec!["generate", "--model"];
        args.extend_from_slice(model);
        args.extend(["--prompt", "I feel tired.", "--max-new-tokens", "6"]);
        args.extend_from_slice(extra);
        let out = hearth(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let tuned = [s(&base), "--adapter", s(&adapter)];
    let chatml = reply(&tuned, &["--template", "chatml"]);
    assert_ne!(
        chatml,
        reply(&[s(&base)], &[]),
        "the templates should differ"
    );
    assert_eq!(reply(&tuned, &[]), chatml);
    // Merged into the base or exported to GGUF (f32, so the weights are the merge's), the
    // adapter keeps its template: the base's would render another prompt.
    let merged = tmp.path().join("merged");
    ok(&[
        "merge",
        "--base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&merged),
    ]);
    assert_eq!(reply(&[s(&merged)], &[]), chatml);
    let gguf = tmp.path().join("tuned.gguf");
    ok(&[
        "export",
        "gguf",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&gguf),
        "--type",
        "f32",
    ]);
    assert_eq!(reply(&[s(&gguf)], &[]), chatml);
    let trained = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|l| l["eval_accuracy"].as_f64())
        .unwrap();
    let out = hearth(&["eval", "preference", "--model", s(&fin), "--data", s(&eval)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ties"], 0, "{report}");
    assert_eq!(report["accuracy"].as_f64(), Some(trained), "{report}");
    // Its adapter under final/adapter carries the template too: the base with it scores
    // the pairs as final/ does.
    assert_eq!(
        std::fs::read_to_string(fin.join("adapter/chat_template.jinja")).unwrap(),
        data::template::CHATML
    );
    let adapter = fin.join("adapter");
    let out = hearth(&[
        "eval",
        "preference",
        "--model",
        s(&base),
        "--adapter",
        s(&adapter),
        "--data",
        s(&eval),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let with_adapter: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        with_adapter["accuracy"], report["accuracy"],
        "{with_adapter}"
    );
}

#[test]
fn reward_model_scores_conversations_and_reports_preference_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = tmp.path().join("base");
    let run = tmp.path().join("reward");
    let pairs = root.join("data/examples/counseling-preference.jsonl");
    ok(&TinyRun::of("tiny-reward.toml", s(&pairs), &base).out(&run));
    let fin = run.join("final");

    // Scores from the merged classifier and from base + SEQ_CLS adapter agree.
    let conversations = tmp.path().join("conv.jsonl");
    let dialogues =
        std::fs::read_to_string(root.join("data/examples/counseling-sft.jsonl")).unwrap();
    std::fs::write(
        &conversations,
        dialogues.lines().take(5).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let scores = |args: &[&str], out: &Path| -> Vec<f64> {
        let mut all = vec![
            "reward",
            "score",
            "--input",
            s(&conversations),
            "--out",
            s(out),
        ];
        all.extend_from_slice(args);
        ok(&all);
        std::fs::read_to_string(out)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["score"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let merged = scores(&["--model", s(&fin)], &tmp.path().join("a.jsonl"));
    // A conversation too long to score is named by its file and line (a blank line
    // before it counts), not by its place among the rows.
    let huge = tmp.path().join("huge.jsonl");
    let long = serde_json::json!({"messages": [
        {"role": "user", "content": "a b c d ".repeat(60_000)},
        {"role": "assistant", "content": "ok"},
    ]});
    let first = dialogues.lines().next().unwrap();
    std::fs::write(&huge, format!("{first}\n\n{long}\n")).unwrap();
    fails(
        &[
            "reward",
            "score",
            "--model",
            s(&fin),
            "--input",
            s(&huge),
            "--out",
            s(&tmp.path().join("never.jsonl")),
        ],
        &["huge.jsonl: line 3", "attention mask"],
    );
    let adapter = fin.join("adapter");
    let unmerged = scores(
        &["--model", s(&base), "--adapter", s(&adapter)],
        &tmp.path().join("b.jsonl"),
    );
    assert_eq!(merged.len(), 5);
    for (m, u) in merged.iter().zip(&unmerged) {
        assert!((m - u).abs() < 1e-3, "merged {m} vs adapter {u}");
    }
    // `hearth merge` of the SEQ_CLS adapter makes the same classifier the run wrote.
    let remerged = tmp.path().join("remerged");
    ok(&[
        "merge",
        "--base",
        s(&base),
        "--adapter",
        s(&adapter),
        "--out",
        s(&remerged),
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(remerged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
    let again = scores(&["--model", s(&remerged)], &tmp.path().join("d.jsonl"));
    for (m, r) in merged.iter().zip(&again) {
        assert!((m - r).abs() < 1e-3, "run's classifier {m} vs merged {r}");
    }
    fails(
        &[
            "reward",
            "score",
            "--model",
            s(&base),
            "--input",
            s(&conversations),
            "--out",
            s(&tmp.path().join("c.jsonl")),
        ],
        &["no score head"],
    );

    // PsychoCounsel-shaped pairs with rating columns: empathy agrees with the preference,
    // safety (on the first 10 pairs) rates the rejected answer higher, elsewhere ties.
    let psycho = tmp.path().join("psychocounsel.jsonl");
    let mut lines = Vec::new();
    for (i, line) in std::fs::read_to_string(&pairs).unwrap().lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let safety = if i < 10 { (1, 5) } else { (3, 3) };
        lines.push(
            serde_json::json!({
                "question": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                "chosen_empathy_rating": 5, "rejected_empathy_rating": 1,
                "chosen_safety_rating": safety.0, "rejected_safety_rating": safety.1,
            })
            .to_string(),
        );
    }
    std::fs::write(&psycho, lines.join("\n")).unwrap();
    let out = hearth(&[
        "eval",
        "preference",
        "--model",
        s(&fin),
        "--data",
        s(&psycho),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let acc = report["accuracy"].as_f64().unwrap();
    assert_eq!(report["source"], "reward_model");
    assert_eq!(report["pairs"], 128);
    assert!(acc >= 0.9, "{report}");
    assert_eq!(report["by_dimension"]["empathy"]["pairs"], 128);
    assert_eq!(
        report["by_dimension"]["empathy"]["accuracy"].as_f64(),
        Some(acc)
    );
    assert_eq!(report["by_dimension"]["safety"]["pairs"], 10);
    assert!(
        report["by_dimension"]["safety"]["accuracy"]
            .as_f64()
            .unwrap()
            <= 0.2,
        "{report}"
    );
    fails(
        &[
            "eval",
            "preference",
            "--model",
            s(&base),
            "--data",
            s(&psycho),
        ],
        &["not a reward model", "--adapter"],
    );
}

/// Opens `page` in headless Chromium (Debian's `chromium`; CI installs it) and checks it
/// as a user would see it: the page renders to a screenshot that is not blank and shows
/// the charts' colours, and the browser's console logged nothing.
fn check_in_browser(page: &Path, shot: &Path) {
    let html = std::fs::read_to_string(page).unwrap();
    // Self-contained: nothing to fetch, no script.
    for outside in [
        "src=", "href=", "url(", "@import", "<script", "http://", "https://",
    ] {
        assert!(
            !html.contains(outside),
            "{}: `{outside}` in the page",
            page.display()
        );
    }
    let profile = shot.with_extension("profile");
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,1800",
            &format!("--user-data-dir={}", s(&profile)),
            &format!("--screenshot={}", s(shot)),
            &format!("file://{}", s(page)),
        ])
        .output()
        .expect("headless Chromium is needed for the report page test: apt-get install chromium");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "chromium failed: {log}");
    let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
    assert!(
        console.is_empty(),
        "the page logged to the console: {console:?}"
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let stride = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("a screenshot in {other:?}"),
    };
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(stride).collect();
    let background = pixels[0];
    let drawn = pixels.iter().filter(|p| p[..3] != background[..3]).count();
    let share = drawn as f64 / pixels.len() as f64;
    assert!(
        share > 0.03,
        "the screenshot is nearly blank ({share:.4} of it drawn)"
    );
    // The charts' first series colour (#0072b2), drawn in more than a few pixels.
    let blue = pixels
        .iter()
        .filter(|p| p[0] < 40 && (90..140).contains(&p[1]) && (150..210).contains(&p[2]))
        .count();
    assert!(
        blue > 200,
        "no chart line on the screenshot ({blue} pixels)"
    );
}

/// `hearth train` ends by writing `report.html`; `hearth report` rewrites it; it holds the
/// run's curves, evaluations, checkpoints and recipe, and renders in a real browser.
#[test]
fn a_run_writes_a_self_contained_report_page_that_renders() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = TinyRun::sft(&tmp.path().join("base"))
        .sets(&[
            "train.max_steps=12",
            "train.save_steps=6",
            "train.eval_steps=6",
        ])
        .out(&run);
    let out = hearth(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = run.join("report.html");
    let html = std::fs::read_to_string(&page).unwrap();
    for part in [
        "<title>hearth run run</title>",
        "aria-label=\"Loss\"",
        "aria-label=\"Learning rate\"",
        "aria-label=\"Grad norm\"",
        "aria-label=\"Tokens per second\"",
        "aria-label=\"Peak memory (MiB)\"",
        "<h2>Evaluations</h2>",
        "<td>checkpoint-6</td>",
        "<td>final</td>",
        "method = &quot;sft&quot;",
    ] {
        assert!(html.contains(part), "`{part}` missing from the page");
    }
    // The eval table has a row per evaluation: steps 6 and 12.
    assert_eq!(
        html.matches("<tr><td>6</td>").count() + html.matches("<tr><td>12</td>").count(),
        2
    );
    std::fs::remove_file(&page).unwrap();
    let again = hearth(&["report", s(&run)]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(std::fs::read_to_string(&page).unwrap(), html);
    check_in_browser(&page, &tmp.path().join("run.png"));
    // Not a run directory: one line naming it.
    fails(
        &["report", s(tmp.path().join("nothing").as_path())],
        &["nothing"],
    );
}

#[test]
fn pipeline_runs_sft_reward_dpo_grpo_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tmp.path().join("p");
    let run = hearth(&[
        "pipeline",
        s(&root.join("recipes/tiny-pipeline.toml")),
        "--out",
        s(&out),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(stdout.contains(&report));
    // One page over every stage, with the pipeline's summary.
    let page = std::fs::read_to_string(out.join("report.html")).unwrap();
    for stage in ["sft", "reward", "dpo", "grpo"] {
        assert!(page.contains(&format!("<h2>Stage {stage}</h2>")), "{stage}");
    }
    assert!(page.contains("aria-label=\"GRPO reward\"") && page.contains("<h2>Summary</h2>"));
    assert!(page.contains("aria-label=\"Rewards (preference)\""));
    check_in_browser(&out.join("report.html"), &tmp.path().join("pipeline.png"));
    for (stage, method) in [
        ("sft", "sft"),
        ("reward", "reward"),
        ("dpo", "dpo"),
        ("grpo", "grpo"),
    ] {
        assert!(out.join(stage).join("final").is_dir(), "{stage}: no final/");
        assert!(
            report.contains(&format!("## {stage} ({method}, ")),
            "{report}"
        );
    }
    // Each stage started from the one before: DPO from the SFT adapter, GRPO from DPO's,
    // scored by the reward model the pipeline trained.
    let resolved =
        |stage: &str| std::fs::read_to_string(out.join(stage).join("recipe.toml")).unwrap();
    assert!(resolved("dpo").contains(&format!("{}", out.join("sft/final").display())));
    assert!(resolved("grpo").contains(&format!("{}", out.join("dpo/final").display())));
    assert!(resolved("grpo").contains(&format!("{}", out.join("reward/final").display())));
    let rewards: Vec<f64> = std::fs::read_to_string(out.join("grpo/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            assert!(v.get("loss").is_none() || v["rewards/reward_model/mean"].is_number());
            v.get("reward")?.as_f64()
        })
        .collect();
    assert_eq!(rewards.len(), 20);
    let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len() as f64;
    // Measured (the recipe's beta 0.2, three numerics: OpenBLAS on 2 threads or 1 thread,
    // gemm): the total reward goes from 1.7-2.6 (first 3 steps) to 3.7-4.2 (last 3).
    assert!(
        mean(&rewards[17..]) > mean(&rewards[..3]) + 1.0,
        "GRPO reward did not rise: {rewards:?}"
    );
    // ... and not by running every completion into the cap (measured: 0.25-0.41 at the end).
    let clipped: Vec<f64> = metric_lines(&out.join("grpo"))
        .iter()
        .filter_map(|l| l["completions/clipped_ratio"].as_f64())
        .collect();
    assert!(mean(&clipped[17..]) <= 0.5, "length gamed: {clipped:?}");
    assert!(!report.contains("warning:"), "{report}");
    // Every generating stage's replies are measured (SFT, DPO, GRPO; not the reward model).
    assert_eq!(
        report
            .matches("replies to the report's prompts: clipped_ratio")
            .count(),
        3,
        "{report}"
    );
    assert!(report.contains("distinct-2"), "{report}");
    assert!(report.contains("## Samples"));
    assert_eq!(report.matches("- client: ").count(), 3, "{report}");

    // Run again into the same directory: finished stages are reused as they are; a stage
    // whose final/ is gone (stopped before any checkpoint) runs again, to the same result.
    std::fs::remove_dir_all(out.join("grpo/final")).unwrap();
    let again = hearth(&[
        "pipeline",
        s(&root.join("recipes/tiny-pipeline.toml")),
        "--out",
        s(&out),
    ]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("reusing the finished run").count(),
        3,
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("report.md")).unwrap(),
        report,
        "the rerun's report differs"
    );
    // A finished stage whose weights were damaged since is named as such (not as a stage
    // of another recipe), and kept for the user to look at.
    let weights = out.join("sft/final/adapter_model.safetensors");
    let whole = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &whole[..whole.len() / 2]).unwrap();
    let damaged = hearth(&[
        "pipeline",
        s(&root.join("recipes/tiny-pipeline.toml")),
        "--out",
        s(&out),
    ]);
    let stderr = String::from_utf8_lossy(&damaged.stderr);
    assert_eq!(damaged.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains("sft/final")
            && last.contains("damaged final weights"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&weights).unwrap().len(), whole.len() / 2);

    // A stage naming a stage that has not run is a one-line error.
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "[[stage]]\nname = \"dpo\"\nrecipe = {:?}\nset = [\"lora.init_from=\\\"{{sft}}/final\\\"\"]\n",
            s(&root.join("recipes/tiny-dpo.toml"))
        ),
    )
    .unwrap();
    fails(
        &["pipeline", s(&bad), "--out", s(&tmp.path().join("q"))],
        &["`{sft}`", "earlier stage"],
    );
}

/// A pipeline whose stages start from different base models (another width) measures
/// each stage's replies on its own base: the report read every adapter onto the last
/// stage's base, and failed on the shapes (or, with equal shapes, measured the wrong
/// model without a word).
#[test]
fn pipeline_stages_on_different_bases_are_each_measured_on_their_own() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let wide = tmp.path().join("wide");
    ok(&[
        "init-model",
        "--out",
        s(&wide),
        "--hidden-size",
        "128",
        "--intermediate-size",
        "256",
    ]);
    let pipeline = tmp.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[report]\nprompts = {prompts:?}\nsamples = 1\nmax_new_tokens = 4\n\
             [[stage]]\nname = \"a\"\nrecipe = {sft:?}\n\
             set = ['model.path=\"{{out}}/base\"', 'data.train={data:?}']\n\
             [[stage]]\nname = \"b\"\nrecipe = {sft:?}\n\
             set = ['model.path={wide:?}', 'data.train={data:?}']\n",
            prompts = s(&root.join("data/examples/counseling-prompts.jsonl")),
            sft = s(&root.join("recipes/tiny-sft.toml")),
            data = s(&root.join("data/examples/counseling-sft.jsonl")),
            wide = s(&wide),
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let run = hearth(&[
        "pipeline",
        s(&pipeline),
        "--out",
        s(&out),
        "--set",
        "train.max_steps=1",
    ]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(
        report
            .matches("replies to the report's prompts: clipped_ratio")
            .count(),
        2,
        "{report}"
    );
}

/// A tiny run of a shipped recipe on bundled data, the base at `base` and `--set`
/// overrides on top: how the training tests here start their runs.
struct TinyRun {
    recipe: PathBuf,
    sets: Vec<String>,
}

impl TinyRun {
    /// `recipes/tiny-sft.toml` on `data/examples/counseling-sft.jsonl`.
    fn sft(base: &Path) -> Self {
        Self::of("tiny-sft.toml", "counseling-sft.jsonl", base)
    }

    /// `recipes/RECIPE` on `data/examples/DATA` (an absolute path is taken as it is).
    fn of(recipe: &str, data: &str, base: &Path) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let data = root.join("data/examples").join(data);
        Self {
            recipe: root.join("recipes").join(recipe),
            sets: vec![
                format!("model.path={:?}", s(base)),
                format!("data.train={:?}", s(&data)),
            ],
        }
    }

    /// More `--set` overrides.
    fn sets(mut self, extra: &[&str]) -> Self {
        self.sets.extend(extra.iter().map(|e| e.to_string()));
        self
    }

    /// `hearth train RECIPE --out RUN --set …`.
    fn out(&self, run: &Path) -> Vec<String> {
        self.args("--out", run)
    }

    /// `hearth train RECIPE --resume RUN --set …`.
    fn resume(&self, run: &Path) -> Vec<String> {
        self.args("--resume", run)
    }

    fn args(&self, verb: &str, run: &Path) -> Vec<String> {
        let mut args = vec![
            "train".into(),
            s(&self.recipe).into(),
            verb.into(),
            s(run).into(),
        ];
        for set in &self.sets {
            args.push("--set".into());
            args.push(set.clone());
        }
        args
    }
}

/// `tiny-grpo.toml` in `tmp` with one command reward, `sh -c SCRIPT` (after it writes its
/// pid to the returned file), and the arguments to train it on the bundled prompts.
fn command_reward_run(tmp: &Path, script: &str) -> (Vec<String>, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tiny = std::fs::read_to_string(root.join("recipes/tiny-grpo.toml")).unwrap();
    let head = &tiny[..tiny.find("[[grpo.rewards]]").unwrap()];
    let pid_file = tmp.join("scorer.pid");
    let recipe = tmp.join("command.toml");
    let command = toml::Value::from(vec![
        "sh".to_string(),
        "-c".into(),
        format!("echo $$ > {}; {script}", s(&pid_file)),
    ]);
    std::fs::write(
        &recipe,
        format!(
            "{head}[[grpo.rewards]]\nkind = \"command\"\ntimeout_s = 100\ncommand = {command}\n"
        ),
    )
    .unwrap();
    let args = vec![
        "train".to_string(),
        s(&recipe).into(),
        "--out".into(),
        s(&tmp.join("run")).into(),
        "--set".into(),
        format!("model.path={:?}", s(&tmp.join("base"))),
        "--set".into(),
        format!(
            "data.train={:?}",
            s(&root.join("data/examples/counseling-prompts.jsonl"))
        ),
    ];
    (args, pid_file)
}

/// The pid a program wrote to `file`, once it has.
fn wait_for_pid(file: &Path) -> u32 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Some(pid) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the program never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether process `pid` is running (not gone, not a zombie), checked for up to `wait`.
fn still_running(pid: u32, wait: std::time::Duration) -> bool {
    let live = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !(state.starts_with('Z') || state.starts_with('X'))
        })
    };
    let deadline = std::time::Instant::now() + wait;
    while live() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    live()
}

/// A reward program outlives no hearth: killed outright (SIGKILL, which hearth cannot
/// catch to end it), hearth takes the program with it instead of leaving it to init.
#[test]
fn a_reward_program_does_not_outlive_a_killed_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (args, pid_file) = command_reward_run(tmp.path(), "exec sleep 300");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(&args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let scorer = wait_for_pid(&pid_file);
    assert!(still_running(scorer, std::time::Duration::ZERO));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !still_running(scorer, std::time::Duration::from_secs(5)),
        "the reward program {scorer} outlived hearth"
    );
}

/// A stop signal while hearth waits on a reward program that takes its time stops the
/// run at once (it waited up to the program's timeout_s), the program with it.
#[test]
fn a_signal_while_waiting_on_a_reward_program_stops_the_run_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let asked = tmp.path().join("asked");
    let (args, pid_file) = command_reward_run(
        tmp.path(),
        &format!("while read l; do touch {}; sleep 60; done", s(&asked)),
    );
    let child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let scorer = wait_for_pid(&pid_file);
    // Once it has been asked, hearth waits for its scores.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !asked.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("stopped by SIGINT while waiting for a reward or client program"),
        "{stderr}"
    );
    assert!(!still_running(scorer, std::time::Duration::from_secs(5)));
}

/// A step whose reward program failed keeps the steps before it: they are written as a
/// checkpoint though none was due, and `--resume` goes on from the failed step to the same
/// final weights as a run that never failed.
#[test]
fn a_failed_step_keeps_the_steps_before_it_for_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken");
    // 32 completions a step: the first of step 3 finds the program broken. Rewards vary
    // with the completion, so the steps learn something to compare.
    let (mut args, _) = command_reward_run(
        tmp.path(),
        &format!(
            "n=0; while read l; do n=$((n+1)); \
             if [ $n -gt 64 ] && [ -e {} ]; then exit 3; fi; echo ${{#l}}; done",
            s(&broken)
        ),
    );
    args.extend(["--set".into(), "train.max_steps=4".into()]);
    let run = tmp.path().join("run");
    let with = |verb: &str, out: &Path| {
        let mut a = args.clone();
        a[2] = verb.into();
        a[3] = s(out).into();
        a
    };
    let whole = tmp.path().join("whole");
    ok(&with("--out", &whole));
    std::fs::write(&broken, "").unwrap();
    let failed = hearth(&with("--out", &run));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("exited before answering")
            && stderr.contains("the 2 steps before step 3 are kept in")
            && stderr.contains("checkpoint-2"),
        "{stderr}"
    );
    assert!(run.join("checkpoint-2").is_dir());
    std::fs::remove_file(&broken).unwrap();
    let resumed = hearth(&with("--resume", &run));
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let adapter = |dir: &Path| std::fs::read(dir.join("final/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter(&run), adapter(&whole));
    // Where a due save wrote those steps already, the error names that checkpoint too.
    std::fs::write(&broken, "").unwrap();
    let saved = tmp.path().join("saved");
    let mut due = with("--out", &saved);
    due.extend(["--set".into(), "train.save_steps=2".into()]);
    let failed = hearth(&due);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("the 2 steps before step 3 are kept in") && stderr.contains("checkpoint-2"),
        "{stderr}"
    );
}

/// A run whose reward program failed before any checkpoint was due resumes by starting
/// over, and says so (it did so silently, which looked like lost steps).
#[test]
fn resuming_a_run_without_a_checkpoint_says_it_starts_over() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = tmp.path().join("broken");
    std::fs::write(&broken, "").unwrap();
    let (mut started, _) = command_reward_run(
        tmp.path(),
        &format!(
            "test -e {} && exit 3; while read l; do echo 1; done",
            s(&broken)
        ),
    );
    started.extend(["--set".into(), "train.max_steps=2".into()]);
    let run = tmp.path().join("run");
    let args = |verb: &str| {
        let mut a = started.clone();
        a[2] = verb.into();
        a
    };
    let failed = hearth(&args("--out"));
    assert_eq!(failed.status.code(), Some(1));
    // Nothing logged, no page: a page would keep a rerun out of the directory.
    assert!(!run.join("report.html").exists());
    std::fs::remove_file(&broken).unwrap();
    let resumed = hearth(&args("--resume"));
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains("no checkpoint to resume from") && stderr.contains("starting the run over"),
        "{stderr}"
    );
    assert!(run.join("final").is_dir());
}

#[test]
fn sigterm_sigint_and_sighup_checkpoint_then_exit_with_the_shell_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let extra = [
        "train.max_steps=40",
        "train.save_steps=0",
        "lora.dropout=0.1",
    ];
    let a = tmp.path().join("a");
    let args = TinyRun::sft(&base).sets(&extra).out(&a);
    ok(&args);
    let final_bytes =
        |run: &Path| std::fs::read(run.join("final/adapter_model.safetensors")).unwrap();

    for (signal, code) in [("TERM", 143), ("INT", 130), ("HUP", 129)] {
        let b = tmp.path().join(format!("b-{signal}"));
        let child = common::hup(&mut Command::new(env!("CARGO_BIN_EXE_hearth")), false)
            .args(TinyRun::sft(&base).sets(&extra).out(&b))
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while std::time::Instant::now() < deadline
            && std::fs::read_to_string(b.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 2
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let status = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "SIG{signal}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.contains(&format!("stopped by SIG{signal} after step"))
                && last.contains("checkpoint-"),
            "{stderr}"
        );
        assert!(!b.join("final").exists());
        let step: usize = last
            .split("after step ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(step < 40 && b.join(format!("checkpoint-{step}")).is_dir());
        // Resuming from the signal's checkpoint ends where the uninterrupted run did.
        let resume = TinyRun::sft(&base).sets(&extra).resume(&b);
        ok(&resume);
        assert!(
            final_bytes(&a) == final_bytes(&b),
            "SIG{signal}: resumed weights differ"
        );
        assert_eq!(loss_lines(&a), loss_lines(&b));
    }
}

/// A run whose last steps were skipped, and whose final weights cannot even be evaluated,
/// diverged: it fails without writing final/. A run in which no step updated anything
/// (GRPO whose every reward overflows) fails too, instead of reporting "trained".
#[test]
fn runs_that_end_diverged_or_never_updated_write_no_final_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("late");
    let args = TinyRun::sft(&base)
        .sets(&[
            "train.learning_rate=1e30",
            "train.warmup_ratio=0",
            "train.max_steps=3",
        ])
        .out(&run);
    let out = hearth(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("last 2 steps were skipped") && stderr.contains("eval_loss is NaN"),
        "{stderr}"
    );
    assert!(!run.join("final").exists());

    // Weights so large (finite, but 1e30) that every forward pass overflows: no step can
    // update them.
    let vast = tmp.path().join("vast");
    ok(&["init-model", "--out", s(&vast), "--init-std", "1e30"]);
    let run = tmp.path().join("never");
    let args = TinyRun::sft(&vast)
        .sets(&["train.max_steps=2", "train.max_bad_steps=10"])
        .out(&run);
    let out = hearth(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("none of the run's 2 steps updated the weights"),
        "{stderr}"
    );
    assert!(!run.join("final").exists());
    // GRPO rewards that would overflow the group's sums are refused when they come.
    let run = tmp.path().join("overflow");
    let overflow = r#"grpo.rewards.1.command=["sh", "-c", "while read l; do echo 1e308; done"]"#;
    let args = TinyRun::of("tiny-grpo.toml", "counseling-prompts.jsonl", &base)
        .sets(&[
            "train.max_steps=2",
            "grpo.max_completion_length=4",
            "grpo.rewards.1.kind=\"command\"",
            overflow,
        ])
        .out(&run);
    let out = hearth(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("beyond ±1e100"), "{stderr}");
    assert!(!run.join("final").exists());
    // A program that answers one line too many only once its input ends: the run's end
    // finds it and warns, naming it, and the run, every step trained, still writes its
    // weights.
    let run = tmp.path().join("late-line");
    let late = r#"grpo.rewards.1.command=["sh", "-c", "while read l; do echo 0; done; echo 1"]"#;
    let args = TinyRun::of("tiny-grpo.toml", "counseling-prompts.jsonl", &base)
        .sets(&[
            "train.max_steps=1",
            "grpo.max_completion_length=4",
            "grpo.rewards.1.kind=\"command\"",
            late,
        ])
        .out(&run);
    let out = hearth(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("a line no question asked for"),
        "{stderr}"
    );
    assert!(run.join("final").is_dir());
}

/// Weights an update already overflowed (here a learning rate at f32's limit) cannot be
/// waited out by skipping: the first bad step says so, naming the update.
#[test]
fn weights_broken_by_an_update_stop_the_run_at_the_next_bad_step() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = TinyRun::sft(&tmp.path().join("base"))
        .sets(&[
            "train.learning_rate=1e38",
            "train.warmup_ratio=0",
            "train.max_steps=20",
            "train.max_bad_steps=10",
        ])
        .out(&run);
    let out = hearth(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("step 2: the weights are NaN or infinite since step 1's update")
            && stderr.contains("learning rate 1e38")
            && stderr.lines().filter(|l| l.starts_with("error:")).count() == 1,
        "{stderr}"
    );
}

#[test]
fn diverging_runs_skip_bad_steps_then_stop_naming_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    // A learning rate of 1e30 wrecks the weights in one update; every later loss is NaN.
    let args = TinyRun::sft(&tmp.path().join("base"))
        .sets(&[
            "train.learning_rate=1e30",
            "train.warmup_ratio=0",
            "train.max_steps=20",
            "train.save_steps=1",
            "train.save_total_limit=10",
            "train.max_bad_steps=3",
        ])
        .out(&run);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let last_saved = {
        let out = hearth(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("NaN or infinite for 3 consecutive steps"),
            "{stderr}"
        );
        stderr
    };
    let lines = metric_lines(&run);
    let skipped: Vec<u64> = lines
        .iter()
        .filter(|l| l["skipped_step"] == true)
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped.len(), 3, "{lines:?}");
    let stop = skipped[2];
    assert!(
        last_saved.contains(&format!("step {stop}:"))
            && last_saved.contains(&format!("checkpoint-{}", stop - 1)),
        "{last_saved}"
    );
    // No NaN reached a checkpoint: every saved adapter holds finite values only.
    for entry in std::fs::read_dir(&run).unwrap().flatten() {
        let path = entry.path().join("adapter_model.safetensors");
        if path.is_file() {
            let files = WeightFiles::open_file(&path).unwrap();
            for name in files.names().map(str::to_string).collect::<Vec<_>>() {
                let (_, v) = read_f32(&path, &name);
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "{}: {name}",
                    path.display()
                );
            }
        }
    }
    assert!(!run.join("final").exists());
    // The run that stopped still has its page, showing the step it reached and its
    // skipped steps, not the last step that logged a loss.
    let page = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(
        page.contains(&format!("<td>steps</td><td>{stop}</td>"))
            && page.contains("<td>skipped steps (non-finite loss or gradient)</td><td>3</td>"),
        "{page}"
    );
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_next_good_one() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("run");
    let extra = [
        "train.max_steps=8",
        "train.save_steps=2",
        "train.save_total_limit=3",
    ];
    let args = TinyRun::sft(&base).sets(&extra).out(&run);
    ok(&args);
    std::fs::remove_dir_all(run.join("final")).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoint-6/manifest.json")).unwrap(),
    )
    .unwrap();
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.bin",
        "trainer_state.json",
    ] {
        assert!(
            manifest["files"][file]["sha256"].is_string(),
            "{file} not in the manifest"
        );
    }
    let resume = TinyRun::sft(&base).sets(&extra).resume(&run);
    let resume: Vec<&str> = resume.iter().map(String::as_str).collect();
    let weights = run.join("checkpoint-6/adapter_model.safetensors");
    let good = std::fs::read(&weights).unwrap();

    // One flipped byte, then a truncated file: both refused, pointing at checkpoint-4.
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    std::fs::write(&weights, &flipped).unwrap();
    fails(
        &resume,
        &[
            "checkpoint-6",
            "adapter_model.safetensors",
            "SHA-256",
            "checkpoint-4",
        ],
    );
    std::fs::write(&weights, &good[..good.len() - 100]).unwrap();
    fails(&resume, &["checkpoint-6", "truncated", "checkpoint-4"]);
    // A file gone altogether: refused the same way, never passed over for checkpoint-4.
    std::fs::write(&weights, &good).unwrap();
    let optimizer = run.join("checkpoint-6/optimizer.bin");
    let optimizer_bytes = std::fs::read(&optimizer).unwrap();
    std::fs::remove_file(&optimizer).unwrap();
    fails(
        &resume,
        &["checkpoint-6", "no optimizer.bin", "checkpoint-4"],
    );
    std::fs::write(&optimizer, optimizer_bytes).unwrap();

    // Moved aside as the message says, the run resumes from checkpoint-4 and finishes, on
    // the CPU only: the optimizer state does not go through burn's default device (a GPU
    // backend where one is built in; Vulkan complains without XDG_RUNTIME_DIR).
    std::fs::rename(run.join("checkpoint-6"), tmp.path().join("damaged")).unwrap();
    let resumed = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(&resume)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("BURN_DEVICE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    assert!(run.join("final/manifest.json").is_file());
}

/// Every case of `tests/bad-inputs/cases.toml` fails with exit 1 and one `error:` line
/// naming its culprit, with no panic and no backtrace.
#[test]
fn bad_input_corpus_fails_cleanly() {
    #[derive(serde::Deserialize)]
    struct Cases {
        case: Vec<Case>,
    }
    #[derive(serde::Deserialize)]
    struct Case {
        name: String,
        #[serde(default)]
        overlay: BTreeMap<String, String>,
        #[serde(default)]
        remove: Vec<String>,
        args: Vec<String>,
        expect: Vec<String>,
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("tests/bad-inputs");
    let cases: Cases =
        toml::from_str(&std::fs::read_to_string(corpus.join("cases.toml")).unwrap()).unwrap();
    assert!(cases.case.len() >= 30, "the corpus needs at least 30 cases");
    let tmp = tempfile::tempdir().unwrap();
    let template_model = tmp.path().join("template-model");
    ok(&["init-model", "--out", s(&template_model)]);
    let mut failures = Vec::new();
    for (i, case) in cases.case.iter().enumerate() {
        let dir = tmp.path().join(format!("case-{i}"));
        let model = dir.join("model");
        copy_dir(&template_model, &model);
        for gone in &case.remove {
            std::fs::remove_file(model.join(gone)).unwrap();
        }
        for (target, source) in &case.overlay {
            std::fs::copy(corpus.join(source), model.join(target)).unwrap();
        }
        let fill = |text: &str| {
            text.replace("{corpus}", s(&corpus))
                .replace("{model}", s(&model))
                .replace("{tmp}", s(&dir))
                .replace("{root}", s(root))
        };
        let args: Vec<String> = case
            .args
            .iter()
            .map(|a| {
                let a = fill(a);
                // Recipes from the corpus run as copies with their placeholders filled.
                if a.ends_with(".toml") && a.starts_with(s(&corpus)) {
                    let text = std::fs::read_to_string(&a).unwrap();
                    let copy = dir.join(Path::new(&a).file_name().unwrap());
                    std::fs::write(&copy, fill(&text)).unwrap();
                    s(&copy).to_string()
                } else {
                    a
                }
            })
            .collect();
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(&args)
            .current_dir(root)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let problem = if out.status.code() != Some(1) {
            Some(format!("exit {:?}", out.status.code()))
        } else if lines.len() != 1 || !lines[0].starts_with("error: ") {
            Some("not one `error:` line".into())
        } else if stderr.contains("panicked") || stderr.contains("internal error") {
            Some("panicked".into())
        } else {
            case.expect
                .iter()
                .find(|n| !stderr.contains(n.as_str()))
                .map(|n| format!("`{n}` not named"))
        };
        if let Some(p) = problem {
            failures.push(format!("{} ({p}): {}", case.name, stderr.trim()));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.case.len(),
        failures.join("\n")
    );
}

/// Whether a test that needs root (a mount, a network namespace) may skip: only on a
/// developer's machine without root. Under CI, or as root, it must run, so a fault path
/// never goes untested silently.
fn may_skip_privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    std::env::var_os("CI").is_none() && !root
}

/// Unmounts a tmpfs when dropped, even when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// `None` where mounting is not permitted (not root, or no mount namespace rights).
    fn mount(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", s(at)])
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self(at.to_path_buf()))
    }
}

impl Tmpfs {
    /// Mounts, or says why the test is skipped (see [`may_skip_privileged`]).
    fn mount_or_skip(at: &Path, size: &str) -> Option<Self> {
        if let Some(m) = Self::mount(at, size) {
            return Some(m);
        }
        assert!(
            may_skip_privileged(),
            "cannot mount a tmpfs at {} (CI or root): the fault test must run",
            at.display()
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); the fault path is untested");
        None
    }

    fn remount_read_only(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,ro", s(&self.0)])
            .status()
            .unwrap();
        assert!(status.success(), "remount read-only failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_training_and_keeps_the_previous_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let mnt = tmp.path().join("small-disk");
    // A checkpoint of the tiny SFT run is about 580 KB: one fits in 1000 KB, two do not.
    let Some(_disk) = Tmpfs::mount_or_skip(&mnt, "1000k") else {
        return;
    };
    let run = mnt.join("run");
    let extra = [
        "train.max_steps=8",
        "train.save_steps=2",
        "train.save_total_limit=2",
    ];
    let args = TinyRun::sft(&base).sets(&extra).out(&run);
    let out = hearth(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("writing checkpoint-4 failed")
            && stderr.contains("No space left on device")
            && stderr.contains("the last complete checkpoint is")
            && stderr.contains("checkpoint-2"),
        "{stderr}"
    );
    // The OS's words, not Rust's Debug form of the error.
    assert!(
        !stderr.contains("Os {") && !stderr.contains("code: 28"),
        "{stderr}"
    );
    // The previous checkpoint is intact (its manifest verifies) and nothing half-written
    // looks like a checkpoint.
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .filter(|n| n.starts_with("checkpoint-"))
            .count()
            == 1,
        "{names:?}"
    );
    checkpoints::verify_manifest(&run.join("checkpoint-2")).unwrap();
    // Moved to a disk with room, the run resumes from it and finishes.
    let roomy = tmp.path().join("roomy");
    copy_dir(&run, &roomy);
    let resume = TinyRun::sft(&base).sets(&extra).resume(&roomy);
    ok(&resume);
    assert!(roomy.join("final/adapter_model.safetensors").is_file());
}

/// Output on a read-only filesystem: a new run refuses to start, and a run whose disk turned
/// read-only since its last checkpoint stops on resume; each with one error line naming the
/// path, and the checkpoint already written stays intact.
#[test]
fn read_only_output_fails_with_one_line_and_keeps_the_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let mnt = tmp.path().join("disk");
    let Some(disk) = Tmpfs::mount_or_skip(&mnt, "64m") else {
        return;
    };
    let run = mnt.join("run");
    let extra = ["train.max_steps=4", "train.save_steps=2"];
    ok(&TinyRun::sft(&base)
        .sets(&extra)
        .out(&run)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    // Back to a run stopped after checkpoint-2, then the disk goes read-only.
    std::fs::remove_dir_all(run.join("final")).unwrap();
    disk.remount_read_only();
    let one_line = |args: Vec<String>, path: &Path| {
        let out = hearth(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("Read-only file system") && stderr.contains(s(path)),
            "{stderr}"
        );
    };
    one_line(TinyRun::sft(&base).sets(&extra).resume(&run), &run);
    checkpoints::verify_manifest(&run.join("checkpoint-2")).unwrap();
    let fresh = mnt.join("fresh");
    one_line(TinyRun::sft(&base).sets(&extra).out(&fresh), &fresh);
    assert!(!fresh.exists());
}

/// hearth never touches the network. Two checks: the binary imports neither `socket` nor
/// `connect` nor a name resolver (so no code path in it can open a connection; a send call
/// some dependency links is harmless without a socket to send on), and training runs to the
/// end inside a network namespace that has no interface, not even loopback.
#[test]
fn training_makes_no_network_access() {
    let bin = env!("CARGO_BIN_EXE_hearth");
    let nm = Command::new("nm")
        .args(["-D", "--undefined-only", bin])
        .output()
        .expect("nm (binutils) must be installed");
    assert!(nm.status.success());
    let imports = String::from_utf8_lossy(&nm.stdout);
    let net: Vec<&str> = imports
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|sym| sym.split('@').next().unwrap_or(sym))
        .filter(|sym| ["socket", "connect", "getaddrinfo", "gethostbyname"].contains(sym))
        .collect();
    assert!(net.is_empty(), "hearth imports network calls: {net:?}");

    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let args = TinyRun::sft(&tmp.path().join("base"))
        .sets(&["train.max_steps=2"])
        .out(&run);
    let isolated = Command::new("unshare")
        .arg("--net")
        .arg(bin)
        .args(&args)
        .output()
        .expect("unshare (util-linux)");
    if !isolated.status.success() && String::from_utf8_lossy(&isolated.stderr).contains("unshare") {
        assert!(
            may_skip_privileged(),
            "unshare --net failed: {}",
            String::from_utf8_lossy(&isolated.stderr)
        );
        eprintln!("SKIPPED: no network namespace without root; the import check still ran");
        return;
    }
    assert!(
        isolated.status.success(),
        "{}",
        String::from_utf8_lossy(&isolated.stderr)
    );
    assert!(run.join("final/adapter_model.safetensors").is_file());
}

/// Every method resumes exactly: each run is SIGKILLed at pseudo-random moments (seeded),
/// resumed after each kill, and must end with the same final files (compared through their
/// manifest's SHA-256s) and the same loss lines as an uninterrupted run.
#[test]
fn sigkill_at_random_moments_resumes_exactly_for_every_method() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    // A kill lands 5–35 % of an uninterrupted run's duration after each (re)start.
    let mut next_delay = |whole: std::time::Duration| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        whole.mul_f64(0.05 + 0.3 * (state % 1000) as f64 / 1000.0)
    };
    for (recipe, data) in [
        ("tiny-sft.toml", "counseling-sft.jsonl"),
        ("tiny-dpo.toml", "counseling-preference.jsonl"),
        ("tiny-orpo.toml", "counseling-preference.jsonl"),
        ("tiny-reward.toml", "counseling-preference.jsonl"),
        ("tiny-grpo.toml", "counseling-prompts.jsonl"),
        ("tiny-session-grpo.toml", "counseling-sessions.jsonl"),
    ] {
        let run = TinyRun::of(recipe, data, &base).sets(&[
            "train.max_steps=12",
            "train.save_steps=2",
            "train.save_total_limit=2",
        ]);
        let args = |verb: &str, dir: &Path| run.args(verb, dir);
        let a = tmp.path().join(format!("{recipe}-a"));
        let started = std::time::Instant::now();
        ok(&args("--out", &a));
        let whole = started.elapsed();

        let b = tmp.path().join(format!("{recipe}-b"));
        let (mut kills, mut resumes) = (0, 0);
        // The newest checkpoint's step: a kill that lands before the next checkpoint makes
        // no progress, so the next delay grows until one does (slow or busy machines).
        let newest = |run: &Path| -> Option<usize> {
            std::fs::read_dir(run)
                .ok()?
                .flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("checkpoint-")?
                        .parse()
                        .ok()
                })
                .max()
        };
        let (mut stretch, mut attempts) = (1.0, 0);
        // Six kills, and more (up to twelve) while none has yet left a checkpoint to
        // resume from: a busy machine can stretch a run's start past several delays.
        while (kills < 6 || (resumes == 0 && kills < 12)) && !b.join("final").exists() {
            let before = newest(&b);
            if before.is_none() {
                // Killed before its first checkpoint: nothing to resume, start over.
                let _ = std::fs::remove_dir_all(&b);
            }
            let verb = if before.is_some() {
                resumes += 1;
                "--resume"
            } else {
                "--out"
            };
            let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
                .args(args(verb, &b))
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(next_delay(whole).mul_f64(stretch));
            let finished = child.try_wait().unwrap().is_some();
            if !finished {
                child.kill().unwrap();
                kills += 1;
            }
            child.wait().unwrap();
            attempts += 1;
            if finished && resumes == 0 && attempts < 30 {
                // It ran to the end before any kill left a checkpoint (the reference run was
                // timed on a busier machine): start over with shorter delays.
                std::fs::remove_dir_all(&b).unwrap();
                stretch *= 0.5;
                continue;
            }
            stretch = if newest(&b) > before {
                1.0
            } else {
                stretch * 1.6
            };
        }
        if !b.join("final").exists() {
            // Enough kills: the last resume runs to the end.
            let verb = if newest(&b).is_some() {
                resumes += 1;
                "--resume"
            } else {
                "--out"
            };
            ok(&args(verb, &b));
        }
        assert!(b.join("final").exists(), "{recipe}: never finished");
        assert!(kills >= 2, "{recipe}: only {kills} kills landed");
        // At least one run continued from a checkpoint a killed run left, so the comparison
        // below is about resuming, not about starting over.
        assert!(
            resumes >= 1,
            "{recipe}: no kill left a checkpoint to resume from"
        );
        let files = |run: &Path| -> serde_json::Value {
            let m: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(run.join("final/manifest.json")).unwrap(),
            )
            .unwrap();
            m["files"].clone()
        };
        assert_eq!(
            files(&a),
            files(&b),
            "{recipe}: final files differ after {kills} kills"
        );
        assert_eq!(loss_lines(&a), loss_lines(&b), "{recipe}: metrics differ");
    }
}

/// The command ends with `needles` in one `error:` line, and `files` are byte for byte
/// what they were before it ran.
fn fails_keeping<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    args: &[S],
    needles: &[&str],
    files: &[&Path],
) {
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    fails(args, needles);
    for (f, b) in files.iter().zip(before) {
        assert!(
            std::fs::read(f).unwrap() == b,
            "{} was changed",
            f.display()
        );
    }
}

#[test]
fn no_command_writes_over_its_inputs_or_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let other = tmp.path().join("other");
    ok(&["init-model", "--out", s(&base)]);
    ok(&["init-model", "--out", s(&other), "--seed", "3"]);
    let run = tmp.path().join("run");
    let args = TinyRun::sft(&base).sets(&["train.max_steps=1"]).out(&run);
    ok(&args);
    let adapter = run.join("final");
    let weights = base.join("model.safetensors");
    let other_weights = other.join("model.safetensors");

    // A run inside its base model is refused before anything is written there.
    let inside = base.join("run");
    fails(
        &TinyRun::sft(&base).out(&inside),
        &["run", "inside the input", "refusing to write here"],
    );
    assert!(!inside.exists());

    fails_keeping(
        &[
            "logits",
            "--model",
            s(&base),
            "--text",
            "hi",
            "--out",
            s(&weights),
        ],
        &["model.safetensors", "refusing to write here"],
        &[&weights],
    );
    fails_keeping(
        &[
            "logits",
            "--model",
            s(&base),
            "--text",
            "hi",
            "--out",
            s(&other_weights),
        ],
        &["already exists"],
        &[&other_weights],
    );
    let merge = |out: &Path| {
        vec![
            "merge".to_string(),
            "--base".into(),
            s(&base).into(),
            "--adapter".into(),
            s(&adapter).into(),
            "--out".into(),
            s(out).into(),
        ]
    };
    for (out, needle, kept) in [
        (&base, "overlaps the input", Some(&weights)),
        (&other, "already holds a model", Some(&other_weights)),
        (&adapter, "overlaps the input", None),
    ] {
        let m = merge(out);
        let m: Vec<&str> = m.iter().map(String::as_str).collect();
        match kept {
            Some(file) => fails_keeping(&m, &[needle], &[file.as_path()]),
            None => {
                fails(&m, &[needle]);
            }
        }
    }
    let m = merge(&tmp.path().join("merged"));
    ok(&m);
    fails(
        &["convert", "--model", s(&base), "--out", s(&other)],
        &["already holds a model"],
    );

    let data = tmp.path().join("d.jsonl");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/examples/counseling-sft.jsonl"),
        &data,
    )
    .unwrap();
    let dotted = tmp.path().join("run/../d.jsonl");
    fails_keeping(
        &[
            "data",
            "render",
            "--tokenizer",
            s(&base),
            "--input",
            s(&data),
            "--out",
            s(&dotted),
        ],
        &["d.jsonl", "refusing to write here"],
        &[&data],
    );
    // Scores over their input, synthetic rows over a model's config: refused before
    // anything loads.
    fails_keeping(
        &[
            "reward",
            "score",
            "--model",
            s(&base),
            "--input",
            s(&data),
            "--out",
            s(&data),
        ],
        &["refusing to write here", "it is the input"],
        &[&data],
    );
    let config = base.join("config.json");
    fails_keeping(
        &[
            "data",
            "generate",
            "--kind",
            "sft",
            "--rows",
            "2",
            "--out",
            s(&config),
        ],
        &["refusing to write here", "already exists"],
        &[&config],
    );
    // Any file already there, a checkpoint's or not: a run's metrics stay metrics.
    let metrics = run.join("metrics.jsonl");
    fails_keeping(
        &["export", "gguf", "--model", s(&base), "--out", s(&metrics)],
        &["metrics.jsonl", "already exists"],
        &[&metrics],
    );
    // A folder with a tokenizer of its own and no weights is not a new model's folder.
    let (tokenizer_only, mine) = tokenizer_only_dir(tmp.path());
    fails_keeping(
        &["init-model", "--out", s(&tokenizer_only)],
        &["tk", "not empty"],
        &[&mine],
    );
    fails_keeping(
        &["convert", "--model", s(&base), "--out", s(&tokenizer_only)],
        &["tk", "not empty"],
        &[&mine],
    );
}

/// `DIR/tk`, a folder holding only a user's `tokenizer.json` (no weights): what no new
/// checkpoint may be written into. Returns the folder and the file.
fn tokenizer_only_dir(dir: &Path) -> (PathBuf, PathBuf) {
    let folder = dir.join("tk");
    std::fs::create_dir(&folder).unwrap();
    let mine = folder.join("tokenizer.json");
    std::fs::write(&mine, "{\"mine\": 1}").unwrap();
    (folder, mine)
}

/// `train` starts only in a new or empty directory (or one a failed start left), and a
/// finished run stays finished: nothing a user or an earlier run wrote is pruned, replaced
/// or trained over.
#[test]
fn runs_start_only_in_their_own_directories_and_finished_runs_stay_finished() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    ok(&["init-model", "--out", s(&base)]);
    let extra = ["train.max_steps=2", "train.save_steps=1"];

    // Another tool's output (a checkpoint a run would prune) and a folder whose only file
    // is a recipe of the user's.
    let foreign = tmp.path().join("foreign");
    std::fs::create_dir_all(foreign.join("checkpoint-1")).unwrap();
    let notes = foreign.join("checkpoint-1/notes.txt");
    std::fs::write(&notes, "keep").unwrap();
    fails_keeping(
        &TinyRun::sft(&base).sets(&extra).out(&foreign),
        &["foreign", "checkpoint-1", "choose another --out"],
        &[&notes],
    );
    let project = tmp.path().join("project");
    std::fs::create_dir(&project).unwrap();
    let own = project.join("recipe.toml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/tiny-sft.toml"),
        &own,
    )
    .unwrap();
    fails_keeping(
        &TinyRun::sft(&base).sets(&extra).out(&project),
        &["recipe.toml", "no hearth run wrote"],
        &[&own],
    );
    // The refused run leaves nothing of its own there, not even its lock file.
    let left: Vec<_> = std::fs::read_dir(&project).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
    // A link in the lock file's place is refused, and what it points to kept.
    let linked = tmp.path().join("linked");
    std::fs::create_dir(&linked).unwrap();
    let precious = tmp.path().join("precious.txt");
    std::fs::write(&precious, "PRECIOUS").unwrap();
    std::os::unix::fs::symlink(&precious, linked.join(".hearth.lock")).unwrap();
    fails_keeping(
        &TinyRun::sft(&base).sets(&extra).out(&linked),
        &[".hearth.lock is not a plain file"],
        &[&precious],
    );
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "PRECIOUS");
    // An --out that links to nothing is named as such.
    let dangling = tmp.path().join("dangling");
    std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
    fails(
        &TinyRun::sft(&base).sets(&extra).out(&dangling),
        &["dangling", "a link to nothing"],
    );

    // A start that failed on its data leaves its recipe.toml alone; the same command
    // starts there once the data is mended.
    let data = tmp.path().join("d.jsonl");
    std::fs::write(&data, "{\"messages\": 3}\n").unwrap();
    let run = tmp.path().join("run");
    let start = TinyRun::of("tiny-sft.toml", s(&data), &base)
        .sets(&extra)
        .out(&run);
    fails(&start, &["d.jsonl", "line 1"]);
    assert!(
        run.join("recipe.toml").is_file(),
        "the failed start wrote no recipe"
    );
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/examples/counseling-sft.jsonl"),
        &data,
    )
    .unwrap();
    ok(&start);

    // A run's resolved recipe copied out and edited by hand reads as hearth's own, but it
    // is the input: a new run there must not write over it (a resume may read it).
    let edited = tmp.path().join("edited");
    std::fs::create_dir(&edited).unwrap();
    let recipe = edited.join("recipe.toml");
    std::fs::copy(run.join("recipe.toml"), &recipe).unwrap();
    let mut from_copy = TinyRun::of("tiny-sft.toml", s(&data), &base).sets(&extra);
    from_copy.recipe = recipe.clone();
    fails_keeping(
        &from_copy.out(&edited),
        &["recipe.toml", "run directory's own"],
        &[&recipe],
    );

    // A base to be made (model.create_if_missing) in a folder that holds other files.
    let (tokenizer_only, mine) = tokenizer_only_dir(tmp.path());
    fails_keeping(
        &TinyRun::sft(&tokenizer_only)
            .sets(&extra)
            .out(&tmp.path().join("made")),
        &["model.path", "create_if_missing", "not empty"],
        &[&mine],
    );

    // Finished: a resume would train its last steps again over final/.
    let adapter = run.join("final/adapter_model.safetensors");
    fails_keeping(
        &TinyRun::of("tiny-sft.toml", s(&data), &base)
            .sets(&extra)
            .resume(&run),
        &["run is finished", "nothing to resume"],
        &[&adapter],
    );
}

#[test]
fn a_tokenizer_with_ids_beyond_the_vocab_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    let big = tmp.path().join("big");
    ok(&["init-model", "--out", s(&small), "--vocab-size", "300"]);
    ok(&["init-model", "--out", s(&big), "--vocab-size", "700"]);
    std::fs::copy(big.join("tokenizer.json"), small.join("tokenizer.json")).unwrap();
    let needles = ["small/tokenizer.json", "largest id is", "vocab_size"];
    let args = TinyRun::sft(&small)
        .sets(&["train.max_steps=1"])
        .out(&tmp.path().join("run"));
    fails(&args, &needles);
    fails(
        &["generate", "--model", s(&small), "--prompt", "hi"],
        &needles,
    );
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/examples/counseling-sft.jsonl");
    fails(
        &["data", "inspect", s(&data), "--tokenizer", s(&small)],
        &needles,
    );
}

/// `hearth data inspect … | head`: the reader goes away, and hearth ends quietly as Unix
/// tools do (the shell's code for SIGPIPE), with nothing on stderr.
#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    ok(&["init-model", "--out", s(&model)]);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/examples/counseling-sft.jsonl");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["data", "inspect", s(&data), "--tokenizer", s(&model)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(out.status.code(), Some(141));
}

#[test]
fn pipelines_are_checked_whole_before_any_stage_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let write = |name: &str, text: String| {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let stage = |name: &str, recipe: &str| {
        format!(
            "[[stage]]\nname = {name:?}\nrecipe = {:?}\n",
            s(&recipes.join(recipe))
        )
    };
    for bad in [
        "..",
        ".",
        ".hearth.lock",
        "",
        "a/b",
        "report.md",
        "report.html",
        "out",
        "final",
        "recipe.toml",
        "metrics.jsonl",
        "a\"b",
    ] {
        let p = write("p.toml", stage(bad, "tiny-sft.toml"));
        let out = tmp.path().join("out");
        fails(
            &["pipeline", s(&p), "--out", s(&out)],
            &["p.toml", "stage name"],
        );
        assert!(!out.exists(), "stage `{bad}`");
    }
    // A mistake in the last stage (a missing recipe, or a setting only training used to
    // refuse, after writing the stage's recipe), or in [report], stops the pipeline before
    // the first.
    for (name, last, needles) in [
        (
            "late",
            stage("dpo", "no-such-recipe.toml"),
            ["stage 2", "no-such-recipe.toml"],
        ),
        (
            "late-lora",
            format!("{}set = [\"lora.r=0\"]\n", stage("dpo", "tiny-dpo.toml")),
            ["stage 2 (`dpo`)", "LoRA rank `r` must be positive"],
        ),
    ] {
        let p = write(
            &format!("{name}.toml"),
            format!(
                "set = [\"model.path=\\\"{}\\\"\"]\n{}{last}",
                s(&tmp.path().join("base")),
                stage("sft", "tiny-sft.toml"),
            ),
        );
        let out = tmp.path().join(name);
        fails(&["pipeline", s(&p), "--out", s(&out)], &needles);
        assert!(!out.exists(), "{name}");
    }
    let p = write(
        "report.toml",
        format!("[report]\nsamples = 3\n{}", stage("sft", "tiny-sft.toml")),
    );
    let out = tmp.path().join("report");
    fails(
        &["pipeline", s(&p), "--out", s(&out)],
        &["[report]", "prompts"],
    );
    assert!(!out.join("sft").exists());
    // A directory whose report.md or report.html is a user's file: the end of the run
    // would write over it, so the run does not start.
    let p = write(
        "one.toml",
        format!(
            "set = [\"model.path=\\\"{}\\\"\"]\n{}",
            s(&tmp.path().join("base")),
            stage("sft", "tiny-sft.toml")
        ),
    );
    for name in ["report.md", "report.html"] {
        let out = tmp.path().join(format!("mine-{name}"));
        std::fs::create_dir(&out).unwrap();
        let mine = out.join(name);
        std::fs::write(&mine, "my notes").unwrap();
        fails_keeping(
            &["pipeline", s(&p), "--out", s(&out)],
            &[name, "choose another --out"],
            &[&mine],
        );
        assert!(!out.join("sft").exists());
    }
}

/// A pipeline file in `tmp` of one stage, `sft` (tiny-sft.toml), with `sets` for all.
fn sft_pipeline(tmp: &Path, sets: &[&str]) -> PathBuf {
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/tiny-sft.toml");
    let mut all = vec![format!("model.path={:?}", s(&tmp.join("base")))];
    all.extend(sets.iter().map(|x| x.to_string()));
    let p = tmp.join("p.toml");
    std::fs::write(
        &p,
        format!(
            "set = {}\n[[stage]]\nname = \"sft\"\nrecipe = {:?}\n",
            toml::Value::from(all),
            s(&recipe)
        ),
    )
    .unwrap();
    p
}

/// The report is the same whether a stage was trained now or reused by a rerun.
#[test]
fn pipeline_reports_the_same_whether_a_stage_trained_now_or_was_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = sft_pipeline(tmp.path(), &["train.max_steps=4", "train.logging_steps=2"]);
    let out = tmp.path().join("p");
    ok(&["pipeline", s(&p), "--out", s(&out)]);
    let trained = std::fs::read_to_string(out.join("report.md")).unwrap();
    ok(&["pipeline", s(&p), "--out", s(&out)]);
    let reused = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert_eq!(trained, reused);
    // Its losses are the logged windows' (means of two steps).
    let first = metric_lines(&out.join("sft"))
        .iter()
        .find_map(|l| l["loss"].as_f64())
        .unwrap();
    assert!(
        trained.contains(&format!("loss: {first:.4} →")),
        "{trained}"
    );
}

/// A stage that starts from an earlier one is not reused once that one was trained again
/// (it reused the DPO trained from the old SFT adapter): it is refused, kept, until moved
/// aside, and then trained from the new adapter, as a fresh pipeline does.
#[test]
fn a_stage_is_not_reused_after_the_stage_it_starts_from_was_retrained() {
    let tmp = tempfile::tempdir().unwrap();
    let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let pipeline = |sft_lr: &str| {
        let p = tmp.path().join("p.toml");
        let list = |items: &[String]| toml::Value::from(items.to_vec());
        std::fs::write(
            &p,
            format!(
                "set = {}\n[[stage]]\nname = \"sft\"\nrecipe = {:?}\nset = {}\n\
                 [[stage]]\nname = \"dpo\"\nrecipe = {:?}\nset = {}\n",
                list(&[
                    format!("model.path={:?}", s(&tmp.path().join("base"))),
                    "train.max_steps=2".into(),
                ]),
                s(&recipes.join("tiny-sft.toml")),
                list(&[format!("train.learning_rate={sft_lr}")]),
                s(&recipes.join("tiny-dpo.toml")),
                list(&["lora.init_from=\"{sft}/final\"".into()]),
            ),
        )
        .unwrap();
        p
    };
    let out = tmp.path().join("p");
    let adapter = |dir: &Path| std::fs::read(dir.join("final/adapter_model.safetensors")).unwrap();
    ok(&["pipeline", s(&pipeline("0.01")), "--out", s(&out)]);
    let old_dpo = adapter(&out.join("dpo"));
    let p = pipeline("0.05");
    // Progress lines come before the error: checked by hand, not with `fails`.
    let refused = |needles: &[&str]| {
        let o = hearth(&["pipeline", s(&p), "--out", s(&out)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        let last = err.lines().last().unwrap_or_default();
        assert!(needles.iter().all(|n| last.contains(n)), "{err}");
    };
    refused(&["sft", "different recipe"]);
    std::fs::rename(out.join("sft"), tmp.path().join("old-sft")).unwrap();
    refused(&[
        "dpo",
        "started from",
        "before that stage was trained again",
        "move it aside",
    ]);
    assert_eq!(adapter(&out.join("dpo")), old_dpo);
    // Run again, the SFT stage is reused now, and the stale DPO still refused.
    refused(&["dpo", "started from", "before that stage was trained again"]);
    std::fs::rename(out.join("dpo"), tmp.path().join("old-dpo")).unwrap();
    ok(&["pipeline", s(&p), "--out", s(&out)]);
    let fresh = tmp.path().join("fresh");
    ok(&["pipeline", s(&p), "--out", s(&fresh)]);
    // A rerun of an unchanged pipeline reuses every stage, the dependent one included.
    let rerun = hearth(&["pipeline", s(&p), "--out", s(&fresh)]);
    let err = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{err}");
    assert_eq!(err.matches("reusing the finished run").count(), 2, "{err}");
    assert_ne!(adapter(&out.join("dpo")), old_dpo);
    assert_eq!(adapter(&out.join("dpo")), adapter(&fresh.join("dpo")));
}

/// A pipeline stopped by a signal says to run it again (`hearth pipeline` has no
/// `--resume`), and running it again finishes the stage from its checkpoint.
#[test]
fn a_stopped_pipeline_says_to_run_it_again_and_that_finishes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let p = sft_pipeline(tmp.path(), &["train.max_steps=100", "train.eval_steps=0"]);
    let out = tmp.path().join("p");
    let child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["pipeline", s(&p), "--out", s(&out)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = out.join("sft/metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline
        && std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 2
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert_eq!(stopped.status.code(), Some(130), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("run the pipeline again with --out") && !last.contains("--resume"),
        "{stderr}"
    );
    let again = hearth(&["pipeline", s(&p), "--out", s(&out)]);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(stderr.contains("resuming"), "{stderr}");
    assert!(out.join("sft/final").is_dir());
}

/// A rerun reuses a finished stage however `--out` is spelt, trains a stage that failed
/// before its first step again (its recipe.toml alone, of another recipe), and the command
/// line's `--set` wins over a stage's own.
#[test]
fn pipeline_reruns_take_up_what_an_earlier_run_left() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/tiny-sft.toml");
    let stage = |name: &str| {
        format!(
            "[[stage]]\nname = {name:?}\nrecipe = {:?}\nset = [\"train.max_steps=3\"]\n",
            s(&recipe)
        )
    };
    let p = tmp.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            "set = [\"model.path=\\\"{}\\\"\", \"train.eval_steps=0\", \"train.save_steps=0\"]\n{}{}",
            s(&tmp.path().join("base")),
            stage("a"),
            stage("b")
        ),
    )
    .unwrap();
    let out = tmp.path().join("p");
    let run = |out: &str| {
        hearth(&[
            "pipeline",
            s(&p),
            "--out",
            out,
            "--set",
            "train.max_steps=1",
        ])
    };
    let first = run(s(&out));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    for name in ["a", "b"] {
        let steps: Vec<u64> = metric_lines(&out.join(name))
            .iter()
            .filter_map(|l| l["step"].as_u64())
            .collect();
        assert_eq!(
            steps.iter().max(),
            Some(&1),
            "{name}: --set lost to the stage's own"
        );
    }
    // Stage b stopped before its first step under another recipe: only its recipe.toml.
    let recipe_b = std::fs::read_to_string(out.join("b/recipe.toml")).unwrap();
    let other = recipe_b.replace("max_steps = 1", "max_steps = 2");
    assert_ne!(other, recipe_b);
    std::fs::remove_dir_all(out.join("b")).unwrap();
    std::fs::create_dir(out.join("b")).unwrap();
    std::fs::write(out.join("b/recipe.toml"), other).unwrap();
    let spelt = format!("{}/sub/.././p/", s(tmp.path()));
    let again = run(&spelt);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("reusing the finished run").count(),
        1,
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("b/recipe.toml")).unwrap(),
        recipe_b
    );
    assert!(out.join("b/final").is_dir());
    // While another process holds the pipeline's directory, a second run is refused, and
    // the stages it holds are left as they are.
    {
        let _first = checkpoints::run_dir::hold(&out).unwrap();
        fails(
            &[
                "pipeline",
                s(&p),
                "--out",
                s(&out),
                "--set",
                "train.max_steps=1",
            ],
            &["is writing this run"],
        );
        assert!(out.join("b/final").is_dir());
    }
    let quoted = tmp.path().join("p\"q");
    fails(
        &["pipeline", s(&p), "--out", s(&quoted)],
        &["p\"q", "may not hold double quotes"],
    );
    assert!(!quoted.exists());
}

/// A run killed before its first checkpoint left a recipe and some metric lines and no
/// weights: `--resume` starts it again from step 0 and ends where an uninterrupted run
/// would.
#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_from_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let extra = ["train.max_steps=3"];
    let whole = tmp.path().join("whole");
    ok(&TinyRun::sft(&base)
        .sets(&extra)
        .out(&whole)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let killed = tmp.path().join("killed");
    std::fs::create_dir(&killed).unwrap();
    std::fs::copy(whole.join("recipe.toml"), killed.join("recipe.toml")).unwrap();
    let first_line = loss_lines(&whole)[0].clone();
    std::fs::write(killed.join("metrics.jsonl"), format!("{first_line}\n")).unwrap();
    let fresh = TinyRun::sft(&base).sets(&extra).out(&killed);
    fails(&fresh, &["already holds a run", "--resume"]);
    // A run whose recipe.toml no longer parses is named as unreadable, not as changed.
    let garbled = tmp.path().join("garbled");
    std::fs::create_dir(&garbled).unwrap();
    std::fs::write(garbled.join("recipe.toml"), "[train\n").unwrap();
    fails(
        &TinyRun::sft(&base).sets(&extra).resume(&garbled),
        &["recipe.toml", "unreadable"],
    );
    ok(&TinyRun::sft(&base)
        .sets(&extra)
        .resume(&killed)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let read = |run: &Path| std::fs::read(run.join("final/adapter_model.safetensors")).unwrap();
    assert!(
        read(&whole) == read(&killed),
        "the restarted run ended elsewhere"
    );
    assert_eq!(loss_lines(&whole), loss_lines(&killed));
}

/// A resume whose data file was changed since the run started is refused naming the file
/// (it resumed on other rows, so the run matched neither data set); with the file as it
/// was, the run finishes.
#[test]
fn a_resume_on_changed_data_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("run");
    let data = tmp.path().join("rows.jsonl");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let original =
        std::fs::read_to_string(root.join("data/examples/counseling-sft.jsonl")).unwrap();
    std::fs::write(&data, &original).unwrap();
    let extra = ["train.max_steps=4", "train.save_steps=2"];
    let tiny = || TinyRun::of("tiny-sft.toml", s(&data), &base).sets(&extra);
    ok(&tiny().out(&run));
    // As if killed after its checkpoint at step 2.
    std::fs::remove_dir_all(run.join("final")).unwrap();
    std::fs::write(
        &data,
        original.replacen(
            "\"role\":\"assistant\",\"content\":\"",
            "\"role\":\"assistant\",\"content\":\"Well. ",
            1,
        ),
    )
    .unwrap();
    assert_ne!(std::fs::read_to_string(&data).unwrap(), original);
    fails(
        &tiny().resume(&run),
        &[
            "rows.jsonl",
            "does not read as the rows the run was trained and evaluated on",
        ],
    );
    std::fs::write(&data, &original).unwrap();
    ok(&tiny().resume(&run));
    assert!(run.join("final").is_dir());
}

/// A resume whose base model was swapped for other weights since the run started (same
/// shapes and tokenizer, so it would load and train on without a word) is refused naming
/// `model.path`, keeping the run; with the base as it was, the run finishes.
#[test]
fn a_resume_on_a_changed_base_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let other = tmp.path().join("other");
    let run = tmp.path().join("run");
    let extra = ["train.max_steps=4", "train.save_steps=2"];
    ok(&TinyRun::sft(&base).sets(&extra).out(&run));
    // As if killed after its checkpoint at step 2.
    std::fs::remove_dir_all(run.join("final")).unwrap();
    ok(&["init-model", "--out", s(&other), "--seed", "7"]);
    let weights = base.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    std::fs::copy(other.join("model.safetensors"), &weights).unwrap();
    assert_ne!(std::fs::read(&weights).unwrap(), original);
    let metrics = run.join("metrics.jsonl");
    fails_keeping(
        &TinyRun::sft(&base).sets(&extra).resume(&run),
        &[
            "--resume: model.path",
            "its files changed since the run started",
        ],
        &[&metrics],
    );
    assert!(!run.join("final").exists());
    std::fs::write(&weights, &original).unwrap();
    ok(&TinyRun::sft(&base).sets(&extra).resume(&run));
    assert!(run.join("final").is_dir());
}

/// A resume on the same number of processes with another accumulation would change the
/// global batch (and so the schedule and the data position): refused before any step,
/// with the accumulation that keeps it; with that one the run finishes.
#[test]
fn a_resume_that_changes_the_global_batch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = tmp.path().join("run");
    let extra = ["train.max_steps=4", "train.save_steps=2"];
    ok(&TinyRun::sft(&base).sets(&extra).out(&run));
    // As if killed after its checkpoint at step 2.
    std::fs::remove_dir_all(run.join("final")).unwrap();
    let metrics = run.join("metrics.jsonl");
    let mut changed = extra.to_vec();
    changed.push("train.gradient_accumulation_steps=2");
    fails_keeping(
        &TinyRun::sft(&base).sets(&changed).resume(&run),
        &[
            "sequences per optimizer step",
            "gradient_accumulation_steps 2",
            "train.gradient_accumulation_steps = 1",
        ],
        &[&metrics],
    );
    assert!(!run.join("final").exists());
    ok(&TinyRun::sft(&base).sets(&extra).resume(&run));
    assert!(run.join("final").is_dir());

    // GRPO takes batch × accumulation completions a step, in one micro-batch of prompts:
    // the same check holds it.
    let grpo = tmp.path().join("grpo");
    let extra = [
        "train.max_steps=4",
        "train.save_steps=2",
        "grpo.max_completion_length=4",
    ];
    let tiny =
        |sets: &[&str]| TinyRun::of("tiny-grpo.toml", "counseling-prompts.jsonl", &base).sets(sets);
    ok(&tiny(&extra).out(&grpo));
    std::fs::remove_dir_all(grpo.join("final")).unwrap();
    let mut changed = extra.to_vec();
    changed.push("train.gradient_accumulation_steps=4");
    fails(
        &tiny(&changed).resume(&grpo),
        &[
            "took 32 sequences per optimizer step",
            "gradient_accumulation_steps = 2",
        ],
    );
    ok(&tiny(&extra).resume(&grpo));
}

/// DPO continuing an SFT adapter whose targets include `lm_head` (the tiny DPO recipe's do
/// not): the adapter is trained as it is, the difference is warned about, and a resumed run
/// still saves the adapter's own config. A resume used to write the recipe's targets beside
/// weights that carry `lm_head`, which PEFT would then drop.
#[test]
fn an_init_from_adapter_keeps_its_own_shape_through_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let sft = tmp.path().join("sft");
    ok(&TinyRun::sft(&base).sets(&["train.max_steps=1"]).out(&sft));
    let init = format!("lora.init_from={:?}", s(&sft.join("final")));
    let dpo = TinyRun::of("tiny-dpo.toml", "counseling-preference.jsonl", &base).sets(&[
        "train.max_steps=4",
        "train.save_steps=2",
        &init,
    ]);
    let run = tmp.path().join("dpo");
    let targets = |dir: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut t: Vec<String> = config["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        t.sort();
        t
    };
    let first = hearth(&dpo.out(&run));
    assert!(first.status.success());
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        stderr.contains("lora.init_from") && stderr.contains("\"lm_head\""),
        "{stderr}"
    );
    let whole = targets(&run.join("final"));
    assert!(whole.contains(&"lm_head".to_string()), "{whole:?}");
    assert_eq!(targets(&run.join("checkpoint-2")), whole);
    let finished = std::fs::read(run.join("final/adapter_model.safetensors")).unwrap();
    std::fs::remove_dir_all(run.join("final")).unwrap();
    ok(&dpo.resume(&run));
    assert_eq!(targets(&run.join("final")), whole);
    assert!(
        std::fs::read(run.join("final/adapter_model.safetensors")).unwrap() == finished,
        "the resumed run ended elsewhere"
    );
}

#[test]
fn a_row_that_cannot_be_rendered_is_named_or_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let data = tmp.path().join("rows.jsonl");
    let good = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/examples/counseling-sft.jsonl"),
    )
    .unwrap();
    let mut lines: Vec<&str> = good.lines().take(12).collect();
    lines.insert(
        3,
        r#"{"messages": [{"role": "user", "content": "Is anyone there?"}]}"#,
    );
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let extra = ["train.max_steps=1", "data.eval_fraction=0"];
    let rows = TinyRun::of("tiny-sft.toml", s(&data), &base);
    let args = rows.sets(&extra).out(&tmp.path().join("a"));
    fails(&args, &["rows.jsonl", "line 4", "no assistant tokens"]);
    let mut skipping = extra.to_vec();
    skipping.push("data.skip_bad_rows=true");
    let args = TinyRun::of("tiny-sft.toml", s(&data), &base)
        .sets(&skipping)
        .out(&tmp.path().join("b"));
    let out = hearth(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("skipped 1 bad rows"), "{stderr}");
}

/// Settings that are valid but make a run learn nothing are said once, before training.
#[test]
fn runs_that_would_learn_nothing_are_warned_about_once() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let warned = |args: Vec<String>, needle: &str| {
        let out = hearth(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let lines: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("warning:"))
            .collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].contains(needle), "{stderr}");
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    warned(
        TinyRun::sft(&base)
            .sets(&["train.max_steps=1", "lora.alpha=0"])
            .out(&tmp.path().join("alpha")),
        "lora.alpha = 0",
    );
    // Preference pairs, three of them with chosen equal to rejected.
    let pairs = tmp.path().join("pairs.jsonl");
    let text =
        std::fs::read_to_string(root.join("data/examples/counseling-preference.jsonl")).unwrap();
    let rows: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if i < 3 {
                v["rejected"] = v["chosen"].clone();
            }
            v.to_string()
        })
        .collect();
    std::fs::write(&pairs, rows.join("\n") + "\n").unwrap();
    let dpo = TinyRun::of("tiny-dpo.toml", s(&pairs), &base)
        .sets(&["train.max_steps=1", "data.eval_fraction=0"])
        .out(&tmp.path().join("dpo"));
    warned(dpo, "3 preference pairs have a chosen completion equal");
    // Evaluations asked for, with nothing to evaluate on.
    warned(
        TinyRun::sft(&base)
            .sets(&["train.max_steps=1", "data.eval_fraction=0"])
            .out(&tmp.path().join("no-eval-set")),
        "train.eval_steps = 10 asks for evaluations, but there is no eval set",
    );
    // GRPO computes no eval loss: held-out prompts are simply lost to training.
    warned(
        TinyRun::of("tiny-grpo.toml", "counseling-prompts.jsonl", &base)
            .sets(&[
                "train.max_steps=1",
                "grpo.max_completion_length=4",
                "data.eval_fraction=0.5",
            ])
            .out(&tmp.path().join("grpo-eval")),
        "evaluation prompts (data.eval, data.eval_fraction) are never used",
    );
    // Packing is for sequences; pairs are read whole.
    warned(
        TinyRun::of("tiny-dpo.toml", "counseling-preference.jsonl", &base)
            .sets(&["train.max_steps=1", "data.packing=true"])
            .out(&tmp.path().join("dpo-packed")),
        "data.packing packs SFT sequences only",
    );
    // Sessions longer than the model's context (the tiny base has 512 positions).
    warned(
        TinyRun::of("tiny-session-grpo.toml", "counseling-sessions.jsonl", &base)
            .sets(&[
                "train.max_steps=1",
                "grpo.max_completion_length=4",
                "grpo.max_turns=1",
                "grpo.max_session_tokens=4000",
            ])
            .out(&tmp.path().join("long-sessions")),
        "grpo.max_session_tokens = 4000 is more than the model's context (512",
    );
    // A warmup as long as the run.
    warned(
        TinyRun::sft(&base)
            .sets(&["train.max_steps=3", "train.warmup_steps=3"])
            .out(&tmp.path().join("warmup")),
        "train.warmup_steps = 3 is not below the run's 3 optimizer steps",
    );
    // Conversations longer than the model's context: a copy of the base that says 64.
    let short = tmp.path().join("short-context");
    std::fs::create_dir(&short).unwrap();
    for entry in std::fs::read_dir(&base).unwrap().flatten() {
        std::fs::copy(entry.path(), short.join(entry.file_name())).unwrap();
    }
    let config = short.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["max_position_embeddings"] = 64.into();
    std::fs::write(&config, c.to_string()).unwrap();
    warned(
        TinyRun::sft(&short)
            .sets(&["train.max_steps=1"])
            .out(&tmp.path().join("long")),
        "longer than the model's context of 64 tokens",
    );
    // Two conversations and a 5 % hold-out: nothing held out, said before the run.
    let two = tmp.path().join("two.jsonl");
    let text = std::fs::read_to_string(root.join("data/examples/counseling-sft.jsonl")).unwrap();
    std::fs::write(
        &two,
        text.lines().take(2).collect::<Vec<_>>().join("\n") + "\n",
    )
    .unwrap();
    warned(
        TinyRun::of("tiny-sft.toml", s(&two), &base)
            .sets(&["train.max_steps=1", "data.eval_fraction=0.05"])
            .out(&tmp.path().join("no-eval")),
        "held out no rows",
    );
    // Everything held out: an error naming the key, not a tokenisation failure.
    fails(
        &TinyRun::of("tiny-sft.toml", s(&two), &base)
            .sets(&["train.max_steps=1", "data.eval_fraction=0.9999999"])
            .out(&tmp.path().join("all-eval")),
        &["two.jsonl", "data.eval_fraction", "none to train on"],
    );
    let grpo = TinyRun::of("tiny-grpo.toml", "counseling-prompts.jsonl", &base)
        .sets(&[
            "train.max_steps=1",
            "grpo.temperature=0",
            "train.per_device_train_batch_size=8",
            "train.gradient_accumulation_steps=1",
            "grpo.max_completion_length=4",
        ])
        .out(&tmp.path().join("grpo"));
    warned(grpo, "grpo.temperature = 0");
}

/// `hearth eval counseling` measures what `hearth generate` + `hearth reward score` and
/// `hearth eval preference` measure on their own, keeps probe and reply text out of its
/// output unless asked, files its results on the run's report page, and refuses bad input
/// in one line.
#[test]
fn counseling_eval_agrees_with_generate_and_reward_score_and_keeps_text_private() {
    let tmp = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let examples = root.join("data/examples");
    let base = tmp.path().join("base");
    let (rm, sft) = (tmp.path().join("rm"), tmp.path().join("sft"));
    let pairs = examples.join("counseling-preference.jsonl");
    ok(&TinyRun::of("tiny-reward.toml", s(&pairs), &base)
        .sets(&["train.max_steps=12"])
        .out(&rm));
    ok(&TinyRun::sft(&base).sets(&["train.max_steps=12"]).out(&sft));
    let (rm, adapter) = (rm.join("final"), sft.join("final"));

    // Held-out prompts, and PsychoCounsel-shaped pairs: empathy agrees with the
    // preference everywhere, safety disagrees on the first 4 pairs and ties elsewhere.
    let prompts = tmp.path().join("prompts.jsonl");
    let all = std::fs::read_to_string(examples.join("counseling-prompts.jsonl")).unwrap();
    std::fs::write(
        &prompts,
        all.lines().skip(20).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let rated = tmp.path().join("rated.jsonl");
    let mut lines = Vec::new();
    for (i, line) in std::fs::read_to_string(&pairs)
        .unwrap()
        .lines()
        .take(16)
        .enumerate()
    {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let safety = if i < 4 { (1, 5) } else { (3, 3) };
        lines.push(
            serde_json::json!({
                "question": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
                "chosen_empathy_rating": 5, "rejected_empathy_rating": 1,
                "chosen_safety_rating": safety.0, "rejected_safety_rating": safety.1,
            })
            .to_string(),
        );
    }
    std::fs::write(&rated, lines.join("\n")).unwrap();

    // The run's evals/ is made for its first results.
    let results = sft.join("evals/counseling.json");
    let eval = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "counseling",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--against",
            s(&base),
            "--reward-model",
            s(&rm),
            "--prompts",
            s(&prompts),
            "--pairs",
            s(&rated),
            "--max-new-tokens",
            "16",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        let run = hearth(&args);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        let json = std::fs::read_to_string(out).unwrap();
        (
            serde_json::from_str::<serde_json::Value>(&json).unwrap(),
            json,
            printed,
        )
    };
    let (report, json, printed) = eval(&results, &[]);

    // The win rate from replies generated and scored by the other commands.
    let replies = |adapter: Option<&Path>, out: &Path| -> Vec<String> {
        let mut args = vec![
            "generate",
            "--model",
            s(&base),
            "--input",
            s(&prompts),
            "--out",
            s(out),
            "--max-new-tokens",
            "16",
        ];
        if let Some(a) = adapter {
            args.extend_from_slice(&["--adapter", s(a)]);
        }
        ok(&args);
        jsonl(out)
            .iter()
            .map(|l| l["reply"].as_str().unwrap().to_string())
            .collect()
    };
    let mine = replies(Some(&adapter), &tmp.path().join("mine.jsonl"));
    let theirs = replies(None, &tmp.path().join("theirs.jsonl"));
    let scores = |replies: &[String], name: &str| -> Vec<f64> {
        let conv = tmp.path().join(format!("{name}-conv.jsonl"));
        let text: Vec<String> = jsonl(&prompts)
            .iter()
            .zip(replies)
            .map(|(p, r)| {
                let mut m = p["prompt"].as_array().unwrap().clone();
                m.push(serde_json::json!({"role": "assistant", "content": r}));
                serde_json::json!({ "messages": m }).to_string()
            })
            .collect();
        std::fs::write(&conv, text.join("\n")).unwrap();
        let out = tmp.path().join(format!("{name}-scores.jsonl"));
        ok(&[
            "reward",
            "score",
            "--model",
            s(&rm),
            "--input",
            s(&conv),
            "--out",
            s(&out),
        ]);
        jsonl(&out)
            .iter()
            .map(|l| l["score"].as_f64().unwrap())
            .collect()
    };
    let (a, b) = (scores(&mine, "mine"), scores(&theirs, "theirs"));
    let w = &report["win_rate"];
    let count = |f: fn(&f64, &f64) -> bool| a.iter().zip(&b).filter(|(x, y)| f(x, y)).count();
    assert_eq!(w["prompts"], 12);
    assert_eq!(w["wins"], count(|x, y| x > y), "{w}");
    assert_eq!(w["ties"], count(|x, y| x == y), "{w}");
    assert_eq!(w["losses"], count(|x, y| x < y), "{w}");
    let rate = (count(|x, y| x > y) as f64 + 0.5 * count(|x, y| x == y) as f64) / 12.0;
    assert!(
        (w["win_rate"].as_f64().unwrap() - rate).abs() < 1e-12,
        "{w}"
    );
    let mean = a.iter().sum::<f64>() / 12.0;
    assert!(
        (w["mean_score"].as_f64().unwrap() - mean).abs() < 1e-6,
        "{w}"
    );
    let ci: Vec<f64> = w["ci95"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(ci[0] <= rate && rate <= ci[1], "{w}");

    // The reward model's accuracy per dimension, as `hearth eval preference` has it.
    let pref = hearth(&["eval", "preference", "--model", s(&rm), "--data", s(&rated)]);
    let pref: serde_json::Value = serde_json::from_slice(&pref.stdout).unwrap();
    let mine_pairs = &report["reward_model_pairs"];
    assert_eq!(mine_pairs["accuracy"], pref["accuracy"]);
    assert_eq!(mine_pairs["by_dimension"], pref["by_dimension"]);
    assert_eq!(mine_pairs["by_dimension"]["empathy"]["pairs"], 16);
    assert_eq!(mine_pairs["by_dimension"]["safety"]["pairs"], 4);

    // Every probe and item is counted, for both models.
    for who in ["model", "against"] {
        assert_eq!(report["crisis"][who]["risk"]["probes"], 24);
        assert_eq!(report["crisis"][who]["ordinary"]["probes"], 11);
        assert_eq!(report["multiple_choice"][who]["items"], 16);
    }

    // No probe, prompt or reply text anywhere, unless asked for.
    let mut texts: Vec<String> = jsonl(&examples.join("crisis-probes.jsonl"))
        .iter()
        .map(|p| p["prompt"].as_str().unwrap().to_string())
        .collect();
    texts.extend(
        mine.iter()
            .chain(&theirs)
            .filter(|r| r.len() >= 12)
            .cloned(),
    );
    for t in &texts {
        assert!(
            !json.contains(t.as_str()) && !printed.contains(t.as_str()),
            "`{t}` leaked"
        );
    }
    assert!(printed.contains("win rate over against") && printed.contains("multiple-choice"));
    // Filed under the run's evals/ too: the text stays in the JSON, off the report page.
    let (shown, shown_json, shown_printed) = eval(
        &sft.join("evals/shown.json"),
        &["--show-text", "--worst", "3"],
    );
    let worst = shown["crisis"]["model"]["worst"].as_array().unwrap();
    assert!(!worst.is_empty() && worst.len() <= 3);
    for case in worst {
        let prompt = case["prompt"].as_str().unwrap();
        assert!(texts.iter().any(|t| t == prompt), "{prompt}");
        assert!(case["reply"].is_string());
        assert!(shown_printed.contains(prompt));
    }
    assert!(shown_json.contains("\"reply\""));

    // Filed under the run's evals/, the results are on its report page.
    let page = std::fs::read_to_string(sft.join("report.html")).unwrap();
    assert!(
        page.contains("Counseling evaluation: counseling.json"),
        "{page}"
    );
    assert!(page.contains("multiple-choice accuracy (16 items)"));
    assert!(page.contains("Counseling evaluation: shown.json"), "{page}");
    assert!(page.contains("text is in shown.json only"), "{page}");
    for case in worst {
        let id = case["id"].as_str().unwrap();
        assert!(page.contains(id), "{id} missing from the page");
        for key in ["prompt", "reply"] {
            let text = case[key].as_str().unwrap();
            assert!(
                text.len() < 12 || !page.contains(html_escaped(text).as_str()),
                "`{text}` on the page"
            );
        }
    }
    for t in &texts {
        assert!(
            !page.contains(html_escaped(t).as_str()),
            "`{t}` on the page"
        );
    }

    // Bad input: one line, nothing overwritten.
    let before = std::fs::read(&rated).unwrap();
    fails(
        &[
            "eval",
            "counseling",
            "--model",
            s(&base),
            "--out",
            s(&rated),
            "--pairs",
            s(&rated),
            "--reward-model",
            s(&rm),
        ],
        &["rated.jsonl"],
    );
    assert_eq!(std::fs::read(&rated).unwrap(), before);
    let o = tmp.path().join("x.json");
    fails(
        &[
            "eval",
            "counseling",
            "--model",
            s(&base),
            "--prompts",
            s(&prompts),
            "--out",
            s(&o),
        ],
        &["--prompts", "--against", "--reward-model"],
    );
    let bad = tmp.path().join("items.jsonl");
    std::fs::write(
        &bad,
        "{\"question\":\"q\",\"options\":[\"a\",\"b\"],\"answer\":\"C\"}\n",
    )
    .unwrap();
    fails(
        &[
            "eval",
            "counseling",
            "--model",
            s(&base),
            "--choices",
            s(&bad),
            "--out",
            s(&o),
        ],
        &["items.jsonl: line 1, column `answer`"],
    );
    assert!(!o.exists());
    // An item past the model's context (512 tokens) is refused by its line before any
    // probe is answered: scored, it read positions never trained, and a long one took
    // memory by the square of its length until the process was killed.
    let long = tmp.path().join("long.jsonl");
    std::fs::write(
        &long,
        format!(
            "{{\"question\":\"q\",\"options\":[\"a\",\"b\"],\"answer\":0}}\n\
             {{\"question\":\"{}\",\"options\":[\"a\",\"b\"],\"answer\":1}}\n",
            "why ".repeat(600)
        ),
    )
    .unwrap();
    fails(
        &[
            "eval",
            "counseling",
            "--model",
            s(&base),
            "--choices",
            s(&long),
            "--out",
            s(&o),
        ],
        &[
            "long.jsonl: line 2: `question` with option 1 takes",
            "more than the model's context of 512",
        ],
    );
    assert!(!o.exists());
    // Pairs are read before any reply is generated: a missing file or a rating that is no
    // number is the only line said, not the end of an hour of answering.
    let rating = tmp.path().join("rating.jsonl");
    std::fs::write(
        &rating,
        "{\"prompt\":\"q\",\"chosen\":\"a\",\"rejected\":\"b\",\"chosen_empathy_rating\":\"five\",\"rejected_empathy_rating\":2}\n",
    )
    .unwrap();
    // A pair the reward model's template cannot render (a side opening with the user's
    // turn) fails there too: the pairs are tokenised as it reads them.
    let turns = tmp.path().join("turns.jsonl");
    std::fs::write(
        &turns,
        "{\"prompt\":\"q\",\"chosen\":\"a\",\"rejected\":\"b\"}\n\
         {\"prompt\":\"q\",\"chosen\":[{\"role\":\"user\",\"content\":\"q\"},\
         {\"role\":\"assistant\",\"content\":\"a\"}],\"rejected\":\"b\"}\n",
    )
    .unwrap();
    // Filed under a run, a failure leaves no evals/ folder behind.
    let filed = rm.parent().unwrap().join("evals/x.json");
    for (pairs, want, o) in [
        (tmp.path().join("missing.jsonl"), "missing.jsonl", &o),
        (rating.clone(), "rating.jsonl: line 1", &filed),
        (turns.clone(), "turns.jsonl: line 2", &filed),
    ] {
        fails(
            &[
                "eval",
                "counseling",
                "--model",
                s(&base),
                "--reward-model",
                s(&rm),
                "--pairs",
                s(&pairs),
                "--out",
                s(o),
            ],
            &[want],
        );
    }
    assert!(!o.exists() && !filed.parent().unwrap().exists());
    // A reward model with no chat template is refused before the replies it would judge.
    let bare = tmp.path().join("bare-rm");
    std::fs::create_dir(&bare).unwrap();
    for f in std::fs::read_dir(&rm).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() && !f.ends_with("chat_template.jinja") {
            std::fs::copy(&f, bare.join(f.file_name().unwrap())).unwrap();
        }
    }
    let config = bare.join("tokenizer_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config, c.to_string()).unwrap();
    fails(
        &[
            "eval",
            "counseling",
            "--model",
            s(&base),
            "--against",
            s(&base),
            "--reward-model",
            s(&bare),
            "--out",
            s(&o),
        ],
        &["bare-rm", "no chat template", "chat_template.jinja"],
    );
    assert!(!o.exists());
    // One whose template refuses what the win-rate prompts hold (a system turn) is refused
    // before the replies too, naming the prompt.
    let strict = tmp.path().join("strict-rm");
    copy_dir(&bare, &strict);
    std::fs::write(
        strict.join("chat_template.jinja"),
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system \
         role') }}{% endif %}{{ m['content'] }}{% endfor %}",
    )
    .unwrap();
    let with_system = tmp.path().join("with-system.jsonl");
    std::fs::write(
        &with_system,
        "{\"prompt\":[{\"role\":\"system\",\"content\":\"Be kind.\"},{\"role\":\"user\",\"content\":\"hi\"}]}\n",
    )
    .unwrap();
    fails(
        &[
            "eval",
            "counseling",
            "--model",
            s(&base),
            "--against",
            s(&base),
            "--reward-model",
            s(&strict),
            "--prompts",
            s(&with_system),
            "--out",
            s(&o),
        ],
        &["prompt 1 of", "with-system.jsonl", "no system role"],
    );
    assert!(!o.exists());
}

/// An evaluation filed under a run and stopped by a signal leaves no `evals/` folder, as a
/// failed one does not: the folder is made when the result is written.
#[test]
fn a_stopped_evaluation_leaves_no_evals_folder() {
    let tmp = tempfile::tempdir().unwrap();
    // Big enough that answering the probes takes seconds.
    let model = tmp.path().join("model");
    ok(&[
        "init-model",
        "--out",
        s(&model),
        "--hidden-size",
        "512",
        "--intermediate-size",
        "1024",
        "--layers",
        "4",
        "--heads",
        "8",
        "--kv-heads",
        "4",
    ]);
    let run = tmp.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("recipe.toml"), "").unwrap();
    let evals = run.join("evals");
    let child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args([
            "eval",
            "counseling",
            "--model",
            s(&model),
            "--max-new-tokens",
            "400",
        ])
        .arg("--out")
        .arg(evals.join("x.json"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The folder is made when the result is written, not while the model answers.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    assert!(!evals.exists());
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(!evals.exists(), "{stderr}");
}

/// `text` as the report page escapes it.
fn html_escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A model directory appears whole or not at all: a convert that fails after writing the
/// weights (a companion file it cannot read) leaves no directory, no temporary one, and an
/// empty `--out` directory empty; a good one fills it.
#[test]
fn a_failed_convert_leaves_no_partial_model() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    ok(&["init-model", "--out", s(&base)]);
    let template = base.join("chat_template.jinja");
    std::fs::write(&template, b"{{ \xff }}").unwrap();
    let out = tmp.path().join("converted");
    fails(
        &["convert", "--model", s(&base), "--out", s(&out)],
        &["chat_template.jinja"],
    );
    let mut left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["base"]);
    std::fs::create_dir(&out).unwrap();
    fails(
        &["convert", "--model", s(&base), "--out", s(&out)],
        &["chat_template.jinja"],
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    std::fs::remove_file(&template).unwrap();
    ok(&["convert", "--model", s(&base), "--out", s(&out)]);
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
}

/// Named templates in transformers' `additional_chat_templates/` travel with a conversion
/// and are what `--template-name` picks; a name the tokenizer does not ship is refused,
/// listing those it does.
#[test]
fn named_templates_are_carried_and_picked_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    ok(&["init-model", "--out", s(&base)]);
    let named = base.join("additional_chat_templates");
    std::fs::create_dir(&named).unwrap();
    let brief = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
    std::fs::write(named.join("brief.jinja"), brief).unwrap();
    let out = tmp.path().join("converted");
    ok(&["convert", "--model", s(&base), "--out", s(&out)]);
    assert_eq!(
        std::fs::read_to_string(out.join("additional_chat_templates/brief.jinja")).unwrap(),
        brief
    );
    let input = tmp.path().join("talk.jsonl");
    std::fs::write(
        &input,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    )
    .unwrap();
    let render = |name: Option<&str>, to: &str| {
        let target = tmp.path().join(to);
        let mut args = vec![
            "data",
            "render",
            "--tokenizer",
            s(&out),
            "--input",
            s(&input),
        ];
        args.extend(["--out", s(&target)]);
        if let Some(n) = name {
            args.extend(["--template-name", n]);
        }
        ok(&args);
        jsonl(&target)[0]["input_ids"].clone()
    };
    let default = render(None, "default.jsonl");
    let picked = render(Some("brief"), "brief.jsonl");
    assert_ne!(default, picked);
    assert_eq!(render(Some("default"), "named-default.jsonl"), default);
    let never = tmp.path().join("never.jsonl");
    fails(
        &[
            "data",
            "render",
            "--tokenizer",
            s(&out),
            "--input",
            s(&input),
            "--out",
            s(&never),
            "--template-name",
            "tool_use",
        ],
        &["no template named `tool_use`", "ships default, brief"],
    );
    assert!(!never.exists());
}

/// `generate` settings that could only give nothing, or the same reply again and again,
/// or run past the model's context, are refused up front, naming the flag.
#[test]
fn generate_refuses_settings_that_give_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    ok(&["init-model", "--out", s(&m)]);
    let prompts =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/examples/counseling-prompts.jsonl");
    let out = tmp.path().join("replies.jsonl");
    let base = ["generate", "--model", s(&m)];
    for (extra, want) in [
        (
            vec!["--prompt", "hi", "--max-new-tokens", "0"],
            "max_new_tokens 0",
        ),
        (
            vec!["--prompt", "hi", "--max-new-tokens", "100000000000"],
            "more than the model's context (max_position_embeddings 512",
        ),
        (vec!["--prompt", "hi", "--top-p", "-1"], "top_p -1"),
        (
            vec!["--prompt", "hi", "--temperature", "-1"],
            "temperature -1",
        ),
        (
            vec!["--input", s(&prompts), "--out", s(&out), "--samples", "3"],
            "--samples 3 with greedy decoding",
        ),
        // --out only takes --input's replies: with a prompt it was silently not written.
        (
            vec!["--prompt", "hi", "--out", s(&out)],
            "is where --input's replies go",
        ),
        (
            vec!["--chat", "--out", s(&out)],
            "is where --input's replies go",
        ),
    ] {
        let args: Vec<&str> = base.iter().copied().chain(extra).collect();
        fails(&args, &[want]);
    }
    assert!(!out.exists());
}
