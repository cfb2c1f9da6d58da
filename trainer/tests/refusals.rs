//! Checkpoints hearth must refuse, each with one error naming the culprit, before any work
//! is done or anything is written: reward heads that cannot score, reward models run as
//! language models, weights holding NaN, tokenizers and side files a reader would refuse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use checkpoints::gguf::{GgufFile, GgufWriter, MetaValue, TensorOut};
use checkpoints::{OwnedTensor, WeightDtype, WeightFiles};
use trainer::chat::{Chat, ChatOptions};
use trainer::generate::Sampling;
use trainer::logits::{LogitsInput, write_logits};
use trainer::model::{NewModel, init_model};

mod common;
use common::root;

const HIDDEN: usize = 64;
const LAYERS: usize = 2;

/// The error of a call that must fail.
fn message<T>(r: trainer::Result<T>) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => {
            let m = e.to_string();
            assert!(!m.contains('\n'), "{m}");
            m
        }
    }
}

fn example(name: &str) -> PathBuf {
    root().join("data/examples").join(name)
}

/// A tiny causal model in `dir`.
fn tiny(dir: &Path) {
    init_model(dir, &NewModel::default(), Default::default()).unwrap();
}

/// Every tensor of the model in `dir`, widened to f32.
fn tensors(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let files = WeightFiles::open_dir(dir).unwrap();
    let names: Vec<String> = files.names().map(String::from).collect();
    names
        .into_iter()
        .map(|n| {
            let t = files.get(&n).unwrap();
            let v = (t.shape.to_vec(), t.to_f32().unwrap());
            (n, v)
        })
        .collect()
}

fn save(dir: &Path, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
    let owned = tensors
        .iter()
        .map(|(n, (s, v))| {
            (
                n.clone(),
                OwnedTensor::from_f32(v, s.clone(), WeightDtype::F32),
            )
        })
        .collect();
    // Written as they are: the checkpoint writer refuses NaN.
    checkpoints::write_safetensors(&dir.join("model.safetensors"), &owned).unwrap();
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// A tiny `LlamaForSequenceClassification` in `dir`: `labels` labels, every score weight
/// `value`.
fn classifier(dir: &Path, labels: usize, value: f32) {
    tiny(dir);
    edit_json(&dir.join("config.json"), |c| {
        c["architectures"] = serde_json::json!(["LlamaForSequenceClassification"]);
        c["num_labels"] = labels.into();
    });
    let mut t = tensors(dir);
    t.remove("lm_head.weight");
    t.insert(
        "score.weight".into(),
        (vec![labels, HIDDEN], vec![value; labels * HIDDEN]),
    );
    save(dir, &t);
}

/// A PEFT adapter in `dir` for the tiny model: rank 1 on q_proj with `lora_B` all `b`,
/// and, as a SEQ_CLS adapter, a score head of `labels` labels, every weight `value`.
fn adapter(dir: &Path, b: f32, score: Option<(usize, f32)>) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": if score.is_some() { "SEQ_CLS" } else { "CAUSAL_LM" },
        "r": 1, "lora_alpha": 1.0, "target_modules": ["q_proj"],
        "modules_to_save": score.map(|_| ["score"]),
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut t = BTreeMap::new();
    let f32s = |v: Vec<f32>, shape: Vec<usize>| OwnedTensor::from_f32(&v, shape, WeightDtype::F32);
    for i in 0..LAYERS {
        let p = format!("base_model.model.model.layers.{i}.self_attn.q_proj");
        t.insert(
            format!("{p}.lora_A.weight"),
            f32s(vec![0.01; HIDDEN], vec![1, HIDDEN]),
        );
        t.insert(
            format!("{p}.lora_B.weight"),
            f32s(vec![b; HIDDEN], vec![HIDDEN, 1]),
        );
    }
    if let Some((labels, value)) = score {
        t.insert(
            "base_model.model.score.weight".into(),
            f32s(vec![value; labels * HIDDEN], vec![labels, HIDDEN]),
        );
    }
    checkpoints::write_safetensors(&dir.join("adapter_model.safetensors"), &t).unwrap();
}

fn counseling<'a>(
    model: &'a Path,
    reward_model: &'a Path,
    out: &'a Path,
    device: &'a Device,
) -> trainer::counseling_eval::Options<'a> {
    trainer::counseling_eval::Options {
        model,
        adapter: None,
        against: Some(model),
        against_adapter: None,
        reward_model: Some(reward_model),
        reward_adapter: None,
        prompts: None,
        probes: None,
        choices: None,
        pairs: None,
        out,
        max_new_tokens: 2,
        batch_size: 8,
        bootstrap: 10,
        seed: 0,
        worst: 1,
        show_text: false,
        max_length: 512,
        device,
    }
}

#[test]
fn a_reward_head_of_two_labels_is_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let (two, out) = (tmp.path().join("two"), tmp.path().join("scores.jsonl"));
    classifier(&two, 2, 0.01);
    let sft = example("counseling-sft.jsonl");
    let pairs = example("counseling-preference.jsonl");
    let cpu = Device::flex();
    let m = message(trainer::evaluate::score_file(&two, None, &sft, &out, &cpu));
    assert!(
        m.contains("a reward model needs one label; this classifier has 2"),
        "{m}"
    );
    assert!(!out.exists());
    let m = message(trainer::evaluate::preference_accuracy(
        &two, None, &pairs, 512, &cpu,
    ));
    assert!(m.contains("needs one label"), "{m}");
    // Refused before the models that answer are even opened (this one does not exist).
    let device = Device::flex();
    let missing = tmp.path().join("no-such-model");
    let m = message(trainer::counseling_eval::run(&counseling(
        &missing,
        &two,
        &tmp.path().join("c.json"),
        &device,
    )));
    assert!(m.contains("needs one label"), "{m}");

    // A SEQ_CLS adapter whose head has two rows: refused by name, also where it is loaded.
    let (base, two_rows) = (tmp.path().join("base"), tmp.path().join("two-rows"));
    tiny(&base);
    adapter(&two_rows, 0.0, Some((2, 0.01)));
    let m = message(trainer::evaluate::score_file(
        &base,
        Some(&two_rows),
        &sft,
        &out,
        &device,
    ));
    assert!(
        m.contains("two-rows/adapter_model.safetensors")
            && m.contains("score.weight")
            && m.contains("needs one label"),
        "{m}"
    );
    let (_, model) = trainer::model::load_model(&base, &device).unwrap();
    let m = message(trainer::model::adapter::load_adapter(
        &two_rows, model, &device,
    ));
    assert!(m.contains("needs one label"), "{m}");
}

#[test]
fn nan_scores_are_errors_naming_the_row() {
    let tmp = tempfile::tempdir().unwrap();
    let (nan, out) = (tmp.path().join("nan"), tmp.path().join("scores.jsonl"));
    // A NaN weight is refused at load, naming the tensor; a finite head as large as f32
    // allows still scores past its range, which names the row.
    let score = |model: &Path| {
        message(trainer::evaluate::score_file(
            model,
            None,
            &example("counseling-sft.jsonl"),
            &out,
            &Device::flex(),
        ))
    };
    classifier(&nan, 1, f32::NAN);
    let m = score(&nan);
    assert!(m.contains("`score.weight` holds NaN"), "{m}");
    std::fs::remove_dir_all(&nan).unwrap();
    classifier(&nan, 1, f32::MAX);
    let m = score(&nan);
    assert!(
        m.contains("counseling-sft.jsonl: line 1") && m.contains("NaN or infinite scores"),
        "{m}"
    );
    assert!(!out.exists(), "scores of null were written");
    let m = message(trainer::evaluate::preference_accuracy(
        &nan,
        None,
        &example("counseling-preference.jsonl"),
        512,
        &Device::flex(),
    ));
    assert!(
        m.contains("counseling-preference.jsonl: line 1") && m.contains("NaN"),
        "{m}"
    );
}

#[test]
fn a_reward_model_is_not_run_as_a_language_model() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let reward = tmp.path().join("reward");
    classifier(&reward, 1, 0.01);
    let (base, seq_cls) = (tmp.path().join("base"), tmp.path().join("seq-cls"));
    tiny(&base);
    adapter(&seq_cls, 0.0, Some((1, 0.01)));
    for (model, adapter, named) in [(&reward, None, &reward), (&base, Some(&seq_cls), &seq_cls)] {
        let out = tmp.path().join("logits.safetensors");
        let texts = ["hi".to_string()];
        let adapter = adapter.map(PathBuf::as_path);
        let m = message(write_logits(
            model,
            adapter,
            LogitsInput::Texts(&texts),
            &out,
            &device,
        ));
        let want = format!("{}: is a reward model", named.display());
        assert!(m.contains(&want), "{m}");
        assert!(!out.exists());
        let m = message(Chat::open(ChatOptions {
            model,
            adapter,
            template: None,
            system: None,
            sampling: Sampling::default(),
            device: &device,
        }));
        assert!(
            m.contains(&want) && m.contains("hearth reward score"),
            "{m}"
        );
    }
}

/// `dir`'s tiny model with a NaN in `model.norm.weight`.
fn nan_model(dir: &Path) {
    tiny(dir);
    let mut t = tensors(dir);
    t.get_mut("model.norm.weight").unwrap().1[3] = f32::NAN;
    save(dir, &t);
}

#[test]
fn weights_holding_nan_are_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (nan, base, nan_adapter) = (
        tmp.path().join("nan"),
        tmp.path().join("base"),
        tmp.path().join("nan-adapter"),
    );
    nan_model(&nan);
    tiny(&base);
    adapter(&nan_adapter, f32::NAN, None);
    // Refused when the weights are read, naming the tensor, so nothing is written.
    let refused = |m: String, out: &Path, tensor: &str| {
        assert!(m.contains("holds NaN") && m.contains(tensor), "{m}");
        assert!(!out.exists(), "{} was written", out.display());
    };
    let out = tmp.path().join("converted");
    let m = message(trainer::model::convert(
        &nan,
        &out,
        None,
        Default::default(),
    ));
    refused(m, &out, "model.norm.weight");
    let out = tmp.path().join("x.gguf");
    let ty = checkpoints::gguf::ExportType::F16;
    refused(
        message(trainer::model::export_to_gguf(&nan, None, &out, ty)),
        &out,
        "model.norm.weight",
    );
    refused(
        message(trainer::model::export_to_gguf(
            &base,
            Some(&nan_adapter),
            &out,
            ty,
        )),
        &out,
        "q_proj.lora_",
    );
    let out = tmp.path().join("merged");
    let m = message(trainer::model::adapter::merge_to_dir(
        &base,
        &nan_adapter,
        &out,
        &Default::default(),
    ));
    refused(m, &out, "model.layers.0.self_attn.q_proj.lora_");

    // A finite weight whose quantized block needs a scale past f16's range: the block
    // would read back as ∞, so the export is refused; kept in f32, it is written.
    let big = tmp.path().join("big");
    tiny(&big);
    let mut t = tensors(&big);
    t.get_mut("model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .1[0] = 1e7;
    save(&big, &t);
    for ty in ["q8_0", "q4_0"] {
        let out = tmp.path().join(format!("big-{ty}.gguf"));
        let ty = checkpoints::gguf::ExportType::parse(ty).unwrap();
        let m = message(trainer::model::export_to_gguf(&big, None, &out, ty));
        assert!(
            m.contains(&out.display().to_string())
                && m.contains("refusing to write weights holding NaN")
                && m.contains("q_proj.weight"),
            "{m}"
        );
        assert!(!out.exists(), "{} was written", out.display());
    }
    let out = tmp.path().join("big-f32.gguf");
    let ty = checkpoints::gguf::ExportType::F32;
    trainer::model::export_to_gguf(&big, None, &out, ty).unwrap();
}

/// Rewrites the GGUF file `from` to `to` with `tokenizer.ggml.tokens` cut to `keep`.
fn cut_tokens(from: &Path, to: &Path, keep: usize) {
    let file = GgufFile::open(from).unwrap();
    let mut w = GgufWriter::new();
    for (key, value) in &file.metadata {
        let value = match (key.as_str(), value) {
            ("tokenizer.ggml.tokens", MetaValue::Array(tokens)) => {
                MetaValue::Array(tokens[..keep].to_vec())
            }
            _ => value.clone(),
        };
        w.meta(key, value);
    }
    for t in &file.tensors {
        w.tensor(TensorOut {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
            bytes: file.bytes(t).to_vec(),
        });
    }
    w.write(to).unwrap();
}

#[test]
fn a_tokenizer_its_readers_refuse_is_not_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, whole, cut) = (
        tmp.path().join("base"),
        tmp.path().join("whole.gguf"),
        tmp.path().join("cut.gguf"),
    );
    tiny(&base);
    let ty = checkpoints::gguf::ExportType::F32;
    trainer::model::export_to_gguf(&base, None, &whole, ty).unwrap();
    cut_tokens(&whole, &cut, 100);
    let device = Device::flex();
    // What `generate` and `logits` say of it...
    let (config, _) = trainer::model::load_model(&cut, &device).unwrap();
    let refusal = message(trainer::model::load_tokenizer(&cut, config.vocab_size));
    assert!(refusal.contains("cut.gguf"), "{refusal}");
    // ...`convert` and `export gguf` say before writing anything.
    let out = tmp.path().join("converted");
    let m = message(trainer::model::convert(
        &cut,
        &out,
        None,
        Default::default(),
    ));
    assert!(m.contains(&refusal), "{m}");
    assert!(!out.exists());
    let out = tmp.path().join("again.gguf");
    let m = message(trainer::model::export_to_gguf(&cut, None, &out, ty));
    assert!(m.contains(&refusal), "{m}");
    assert!(!out.exists());
}

#[test]
fn side_files_naming_tokens_are_checked_and_a_missing_one_is_fine() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    tiny(&m);
    let load = || trainer::model::load_tokenizer(&m, 512);
    let (config, _) = trainer::model::load_model(&m, &Device::flex()).unwrap();
    let stops = || trainer::generate::stop_tokens(&m, &config, &load().unwrap());
    // No generation_config.json: the config's and the tokenizer config's eos.
    let eot = load().unwrap().token_to_id("<|eot_id|>").unwrap();
    assert_eq!(stops(), {
        let mut s = vec![4, eot];
        s.sort_unstable();
        s.dedup();
        s
    });
    let gc = m.join("generation_config.json");
    std::fs::write(&gc, r#"{"eos_token_id": [7, 9]}"#).unwrap();
    assert!(stops().contains(&7) && stops().contains(&9));
    for (text, want) in [
        ("[4]", "expected a JSON object"),
        ("{\"eos_token_id\": ", "invalid JSON"),
        (r#"{"eos_token_id": "<|eot_id|>"}"#, "`eos_token_id`"),
        (r#"{"eos_token_id": [4, -1]}"#, "`eos_token_id`: -1"),
        // 2^32 + 4 is not 4.
        (
            r#"{"eos_token_id": 4294967300}"#,
            "`eos_token_id`: 4294967300",
        ),
        (r#"{"eos_token_id": 512}"#, "`eos_token_id`: 512"),
    ] {
        std::fs::write(&gc, text).unwrap();
        let e = message(load());
        assert!(
            e.contains("generation_config.json") && e.contains(want),
            "{text}: {e}"
        );
        // Nothing is converted from it either.
        let out = tmp.path().join("converted");
        message(trainer::model::convert(&m, &out, None, Default::default()));
        assert!(!out.exists());
    }
    std::fs::remove_file(&gc).unwrap();
    std::fs::create_dir(&gc).unwrap();
    assert!(message(load()).contains("generation_config.json"));
    std::fs::remove_dir(&gc).unwrap();

    let tc = m.join("tokenizer_config.json");
    let original = std::fs::read_to_string(&tc).unwrap();
    for key in ["bos_token", "eos_token", "pad_token"] {
        edit_json(&tc, |c| c[key] = "<|not-a-token|>".into());
        let e = message(load());
        assert!(
            e.contains("tokenizer_config.json")
                && e.contains(&format!("`{key}`"))
                && e.contains("<|not-a-token|>"),
            "{e}"
        );
        std::fs::write(&tc, &original).unwrap();
    }
    // The AddedToken form, and null, are fine.
    edit_json(&tc, |c| {
        c["eos_token"] = serde_json::json!({"content": "<|eot_id|>", "special": true});
        c["pad_token"] = serde_json::Value::Null;
    });
    load().unwrap();
}

/// A reward model `eval counseling` cannot use is refused before any model that answers
/// is opened (here one that does not exist): a causal model, a base with a causal-LM (DPO)
/// adapter — whose implicit reward would otherwise be reported as the reward model's
/// accuracy — and a reward model with nothing to judge.
#[test]
fn counseling_eval_refuses_a_reward_model_it_cannot_use_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let (base, dpo, rm) = (
        tmp.path().join("base"),
        tmp.path().join("dpo"),
        tmp.path().join("rm"),
    );
    tiny(&base);
    adapter(&dpo, 0.01, None);
    classifier(&rm, 1, 0.01);
    let missing = tmp.path().join("no-such-model");
    let out = tmp.path().join("c.json");
    let pairs = example("counseling-preference.jsonl");
    for reward_adapter in [None, Some(dpo.as_path())] {
        let mut o = counseling(&missing, &base, &out, &device);
        o.against = None;
        o.pairs = Some(&pairs);
        o.reward_adapter = reward_adapter;
        let m = message(trainer::counseling_eval::run(&o));
        assert!(
            m.contains("base: the model has no score head") && !m.contains("no-such-model"),
            "{m}"
        );
    }
    let mut o = counseling(&missing, &rm, &out, &device);
    o.against = None;
    let m = message(trainer::counseling_eval::run(&o));
    assert!(
        m.contains("--reward-model") && m.contains("--against") && m.contains("--pairs"),
        "{m}"
    );
    assert!(!out.exists());
}

/// Writes `lines` joined by newlines to `dir/name`.
fn lines_file(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// Errors in `eval preference` and `reward score` input name the file and the row's own
/// line, counted past blank lines, and the key.
#[test]
fn preference_and_score_errors_name_the_line_past_blank_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let cpu = Device::flex();
    let rm = tmp.path().join("rm");
    classifier(&rm, 1, 0.01);
    let good =
        r#"{"prompt": "I feel low.", "chosen": "That sounds hard.", "rejected": "Get over it."}"#;
    let pref = |name: &str, third: &str| {
        let path = lines_file(tmp.path(), name, &[good, "", third]);
        message(trainer::evaluate::preference_accuracy(
            &rm, None, &path, 512, &cpu,
        ))
    };
    let m = pref(
        "tokens.jsonl",
        r#"{"prompt": "p", "chosen": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}], "rejected": "b"}"#,
    );
    assert!(
        m.contains("tokens.jsonl: line 3: ") && m.contains("column `chosen`"),
        "{m}"
    );
    // A file of conversations: the first row, on line 3, is not a pair.
    let shape = lines_file(
        tmp.path(),
        "shape.jsonl",
        &[
            "",
            "",
            r#"{"messages": [{"role": "user", "content": "p"}, {"role": "assistant", "content": "a"}]}"#,
        ],
    );
    let m = message(trainer::evaluate::preference_accuracy(
        &rm, None, &shape, 512, &cpu,
    ));
    assert!(
        m.contains("shape.jsonl: line 3: expected a preference pair"),
        "{m}"
    );
    let m = pref(
        "rating.jsonl",
        r#"{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_empathy_rating": "five", "rejected_empathy_rating": 1}"#,
    );
    assert!(
        m.contains("rating.jsonl: line 3: key `chosen_empathy_rating` is \"five\""),
        "{m}"
    );

    let conv = r#"{"messages": [{"role": "user", "content": "I feel low."}, {"role": "assistant", "content": "That sounds hard."}]}"#;
    let out = tmp.path().join("scores.jsonl");
    let score = |name: &str, third: &str| {
        let path = lines_file(tmp.path(), name, &[conv, "", third]);
        message(trainer::evaluate::score_file(&rm, None, &path, &out, &cpu))
    };
    // A file of pairs: the first row, on line 3, is not a conversation.
    let pairs = lines_file(tmp.path(), "pair.jsonl", &["", "", good]);
    let m = message(trainer::evaluate::score_file(&rm, None, &pairs, &out, &cpu));
    assert!(
        m.contains("pair.jsonl: line 3: expected a conversation"),
        "{m}"
    );
    let m = score(
        "open.jsonl",
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]}"#,
    );
    assert!(
        m.contains("open.jsonl: line 3: key `messages` does not end with an assistant reply"),
        "{m}"
    );
    assert!(!out.exists());
    // Blank lines are not rows: one score line per row.
    let ok = lines_file(tmp.path(), "ok.jsonl", &["", conv, "", "", conv, ""]);
    let n = trainer::evaluate::score_file(&rm, None, &ok, &out, &cpu).unwrap();
    assert_eq!(n, 2);
    assert_eq!(std::fs::read_to_string(&out).unwrap().lines().count(), 2);
}

/// A reward model that scores everything alike is at chance, 0.5, overall and on every
/// dimension (a zero margin counts half); pairs cut to `max_length` are counted.
#[test]
fn preference_accuracy_counts_ties_half_and_reports_truncated_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let cpu = Device::flex();
    let flat = tmp.path().join("flat");
    classifier(&flat, 1, 0.0);
    let rows: Vec<String> = (0..5)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("I have felt low for {i} weeks and I cannot sleep at night."),
                "chosen": "That sounds exhausting. What has helped before, even a little?",
                "rejected": "Just sleep more.",
                // Ratings agree with the preference on even rows, disagree on odd ones.
                "chosen_empathy_rating": if i % 2 == 0 { 5 } else { 1 },
                "rejected_empathy_rating": 3,
            })
            .to_string()
        })
        .collect();
    let path = tmp.path().join("pairs.jsonl");
    std::fs::write(&path, rows.join("\n")).unwrap();
    let full = trainer::evaluate::preference_accuracy(&flat, None, &path, 512, &cpu).unwrap();
    assert_eq!(
        (full.pairs, full.ties, full.truncated, full.dropped),
        (5, 5, 0, 0)
    );
    assert_eq!(full.accuracy, 0.5);
    assert_eq!(full.by_dimension["empathy"].accuracy, 0.5);
    assert_eq!(full.by_dimension["empathy"].pairs, 5);
    // Every pair is longer than 16 tokens: all evaluated, all counted as cut.
    let cut = trainer::evaluate::preference_accuracy(&flat, None, &path, 16, &cpu).unwrap();
    assert_eq!((cut.pairs, cut.truncated, cut.dropped), (5, 5, 0));
}
