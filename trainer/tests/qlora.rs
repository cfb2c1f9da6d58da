//! QLoRA: a base whose frozen projections are stored quantized computes what the same
//! model with those weights dequantized computes, trains only its adapters, keeps its
//! quantized parts in f32 under bf16 compute, merges by dequantizing, and its shipped tiny
//! recipe starts within 5% of the unquantized run's loss and learns.

use std::path::Path;

use burn::module::Param;
use burn::tensor::{DType, Device, Int, Tensor, TensorData, Tolerance};
use trainer::choices::Quantize;
use trainer::model::adapter::{LoraSettings, attach_lora, merge_lora};
use trainer::model::linear::Weight;
use trainer::model::precision::Precision;
use trainer::model::quantized::Quantization;
use trainer::model::{Llama, NewModel, init_model, load_model, load_model_with, with_precision};
use trainer::train::train;

mod common;
use common::{losses, serial, shipped_recipe};

/// A small model whose every projection row is a whole number of NF4 and Q8_0 blocks
/// (hidden 128, MLP 192), at transformers' initializer range.
fn base(dir: &Path) {
    let spec = NewModel {
        hidden_size: 128,
        intermediate_size: 192,
        init_std: 0.02,
        seed: 3,
        ..Default::default()
    };
    init_model(dir, &spec, Default::default()).unwrap();
}

fn quant(scheme: Quantize) -> Quantization {
    Quantization::new(scheme, &[])
}

fn logits(model: &Llama, device: &Device) -> Vec<f32> {
    let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 500).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 12]), device);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; 24], [2, 12]), device);
    model
        .logits(model.hidden(ids, mask))
        .cast(DType::F32)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap()
}

/// The RMS of `a − b` relative to the RMS of `b`.
fn rel_rms(a: &[f32], b: &[f32]) -> f32 {
    let err: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = b.iter().map(|y| y * y).sum();
    (err / norm).sqrt()
}

/// The dense model with each projection replaced by `quantized`'s dequantized weight.
fn dequantized_twin(mut dense: Llama, quantized: &Llama) -> Llama {
    for (layer, q) in dense.layers.iter_mut().zip(&quantized.layers) {
        let pairs = [
            (&mut layer.self_attn.q_proj, &q.self_attn.q_proj),
            (&mut layer.self_attn.k_proj, &q.self_attn.k_proj),
            (&mut layer.self_attn.v_proj, &q.self_attn.v_proj),
            (&mut layer.self_attn.o_proj, &q.self_attn.o_proj),
            (&mut layer.mlp.gate_proj, &q.mlp.gate_proj),
            (&mut layer.mlp.up_proj, &q.mlp.up_proj),
            (&mut layer.mlp.down_proj, &q.mlp.down_proj),
        ];
        for (d, q) in pairs {
            d.weight = Weight::Dense(Param::from_tensor(q.dense_weight()));
        }
    }
    dense
}

#[test]
fn a_quantized_base_computes_what_its_dequantized_weights_compute() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    base(&path);
    let device = Device::flex();
    let (_, dense) = load_model(&path, &device).unwrap();
    let exact = logits(&dense, &device);
    for scheme in [Quantize::Nf4, Quantize::Q8_0] {
        let (_, q) = load_model_with(&path, &device, &quant(scheme)).unwrap();
        assert!(
            q.projections()
                .all(|p| matches!(p.weight, Weight::Quantized(_))),
            "every projection is quantized"
        );
        assert!(matches!(
            q.lm_head.as_ref().unwrap().weight,
            Weight::Dense(_)
        ));
        let got = logits(&q, &device);
        let twin = dequantized_twin(load_model(&path, &device).unwrap().1, &q);
        let want = logits(&twin, &device);
        TensorData::new(got.clone(), [got.len()]).assert_approx_eq::<f32>(
            &TensorData::new(want, [got.len()]),
            Tolerance::rel_abs(1e-4, 1e-4),
        );
        // And the quantization itself stays near the dense model, Q8_0 much nearer:
        // measured 0.16 (NF4) and 0.010 (Q8_0) of the logits' RMS.
        let rel = rel_rms(&got, &exact);
        let bound = if scheme == Quantize::Nf4 { 0.3 } else { 0.03 };
        assert!(rel < bound, "{scheme:?}: logit error {rel} of their RMS");
    }

    // Skipped projections stay dense.
    let skip = Quantization::new(Quantize::Nf4, &["down_proj".into()]);
    let (_, q) = load_model_with(&path, &device, &skip).unwrap();
    assert!(matches!(q.layers[0].mlp.down_proj.weight, Weight::Dense(_)));
    assert!(matches!(
        q.layers[0].mlp.up_proj.weight,
        Weight::Quantized(_)
    ));
}

/// `model.quantize_embeddings`: the embedding table and the head (one matrix when tied)
/// are quantized too, and the model computes what its dequantized twin computes.
#[test]
fn embeddings_and_head_quantize_on_request_tied_or_not() {
    let device = Device::flex();
    for tied in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let spec = NewModel {
            hidden_size: 128,
            intermediate_size: 192,
            init_std: 0.02,
            seed: 5,
            tie_word_embeddings: tied,
            ..Default::default()
        };
        init_model(&path, &spec, Default::default()).unwrap();
        let q = quant(Quantize::Nf4).with_embeddings(true);
        let (_, model) = load_model_with(&path, &device, &q).unwrap();
        assert!(matches!(model.embed_tokens, Weight::Quantized(_)));
        assert_eq!(model.lm_head.is_none(), tied);
        if let Some(head) = &model.lm_head {
            assert!(matches!(head.weight, Weight::Quantized(_)), "lm_head");
        }
        let mut twin = dequantized_twin(load_model(&path, &device).unwrap().1, &model);
        twin.embed_tokens = Weight::Dense(Param::from_tensor(model.embed_tokens.dense()));
        if let (Some(d), Some(q)) = (twin.lm_head.as_mut(), model.lm_head.as_ref()) {
            d.weight = Weight::Dense(Param::from_tensor(q.dense_weight()));
        }
        let got = logits(&model, &device);
        let want = logits(&twin, &device);
        TensorData::new(got.clone(), [got.len()]).assert_approx_eq::<f32>(
            &TensorData::new(want.clone(), [got.len()]),
            Tolerance::rel_abs(1e-4, 1e-4),
        );
        // The embeddings' rows are not the dense model's: the quantization is in play.
        let exact = logits(&load_model(&path, &device).unwrap().1, &device);
        assert!(
            rel_rms(&got, &exact) > 1e-3,
            "tied {tied}: embeddings quantized"
        );
        // The default leaves them dense.
        let (_, plain) = load_model_with(&path, &device, &quant(Quantize::Nf4)).unwrap();
        assert!(matches!(plain.embed_tokens, Weight::Dense(_)));
    }
}

#[test]
fn only_adapters_take_gradients_and_bf16_keeps_the_scales_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    base(&path);
    let device = Device::flex().autodiff();
    let (_, q) = load_model_with(&path, &device, &quant(Quantize::Nf4)).unwrap();
    let settings = LoraSettings {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: vec!["q_proj".into(), "down_proj".into()],
        use_rslora: false,
        layers_to_transform: None,
    };
    use burn::module::Module;
    let model = attach_lora(q.no_grad(), &settings, &device).unwrap();
    // B starts at zero; move it so the adapters change the output.
    let mut model = model;
    for layer in model.layers.iter_mut() {
        for proj in [&mut layer.self_attn.q_proj, &mut layer.mlp.down_proj] {
            let lora = proj.lora.as_mut().unwrap();
            let b = lora.b.val();
            lora.b = Param::from_tensor(b.ones_like().mul_scalar(0.01)).set_require_grad(true);
        }
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![5i64, 9, 77, 3], [1, 4]), &device);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; 4], [1, 4]), &device);
    let loss = model.hidden(ids, mask).powi_scalar(2).mean();
    let grads = loss.backward();
    let q = &model.layers[0].self_attn.q_proj;
    let lora = q.lora.as_ref().unwrap();
    assert!(lora.a.val().grad(&grads).is_some());
    assert!(lora.b.val().grad(&grads).is_some());
    let Weight::Quantized(qw) = &q.weight else {
        panic!("q_proj is quantized")
    };
    assert!(qw.scales.val().grad(&grads).is_none());
    assert!(qw.code.val().grad(&grads).is_none());

    // bf16 compute: dense frozen weights are halved, the quantized parts are not.
    let skip = Quantization::new(Quantize::Nf4, &["up_proj".into()]);
    let (_, fresh) = load_model_with(&path, &device, &skip).unwrap();
    let fresh = attach_lora(fresh, &settings, &device).unwrap();
    let half = with_precision(fresh, Precision::Bf16);
    let q = &half.layers[0].self_attn.q_proj;
    let Weight::Quantized(qw) = &q.weight else {
        panic!("q_proj is quantized")
    };
    assert_eq!(qw.scales.val().dtype(), DType::F32);
    assert_eq!(qw.code.val().dtype(), DType::F32);
    assert_eq!(
        half.layers[0].input_layernorm.weight.val().dtype(),
        DType::BF16
    );
    assert_eq!(
        half.layers[0].mlp.up_proj.dense_weight().dtype(),
        DType::BF16
    );
    // Its forward (the projections' matmuls in bf16) stays near the f32 one.
    let (a, b) = (logits(&half, &device), logits(&model, &device));
    let rel = rel_rms(&a, &b);
    // Measured 0.028.
    assert!(rel < 0.1, "bf16 vs f32 logits: {rel} of their RMS");

    // Merging dequantizes: W' = dequant(W) + s·B·A, dense.
    let plain = Device::flex();
    let (_, q) = load_model_with(&path, &plain, &quant(Quantize::Nf4)).unwrap();
    let mut model = attach_lora(q, &settings, &plain).unwrap();
    let lora = model.layers[0].self_attn.q_proj.lora.as_mut().unwrap();
    lora.b = Param::from_tensor(lora.b.val().ones_like().mul_scalar(0.01));
    let q = &model.layers[0].self_attn.q_proj;
    let want = q.dense_weight() + q.lora.as_ref().unwrap().merged_delta();
    let merged = merge_lora(model);
    let m = &merged.layers[0].self_attn.q_proj;
    assert!(matches!(m.weight, Weight::Dense(_)) && m.lora.is_none());
    m.dense_weight()
        .into_data()
        .assert_approx_eq::<f32>(&want.into_data(), Tolerance::rel_abs(1e-6, 1e-6));
}

/// The shipped tiny QLoRA recipe against the tiny LoRA one on the same base: the first
/// step's loss (before any update, so only quantization differs) within 5%, and the run
/// learns.
#[test]
fn the_tiny_qlora_recipe_starts_near_the_dense_loss_and_learns() {
    let _turn = serial();
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let run = |recipe: &str, out: &str, extra: &[&str]| {
        let mut sets = vec!["train.max_steps=12", "train.eval_steps=0"];
        sets.extend_from_slice(extra);
        let r = shipped_recipe(recipe, "counseling-sft.jsonl", &base, &sets);
        let dir = tmp.path().join(out);
        train(&r, &dir, false, false).unwrap();
        losses(&dir)
    };
    let dense = run("tiny-sft.toml", "dense", &[]);
    let q = run("tiny-qlora.toml", "qlora", &[]);
    let rel = (q[0] - dense[0]).abs() / dense[0];
    assert!(
        rel < 0.05,
        "first-step loss {} vs {} ({rel})",
        q[0],
        dense[0]
    );
    assert!(q[11] < 0.8 * q[0], "QLoRA learns: {q:?}");
    // With the embeddings and the head quantized too, through the fused log-probs (the
    // head's own adapter dropped, so the quantized head takes the fused path): the run
    // tracks the one with a dense head and embeddings, step by step.
    let targets = "lora.targets=[\"q_proj\", \"v_proj\", \"up_proj\"]";
    let fused = "train.kernels=\"fused\"";
    let projections = run("tiny-qlora.toml", "qlora-projections", &[fused, targets]);
    let all = run(
        "tiny-qlora.toml",
        "qlora-all",
        &["model.quantize_embeddings=true", fused, targets],
    );
    eprintln!("{projections:?}\n{all:?}");
    for (step, (a, p)) in all.iter().zip(&projections).enumerate() {
        let rel = (a - p).abs() / p;
        assert!(rel < 0.01, "step {step}: {a} vs {p} ({rel})");
    }
    assert!(all[11] < 0.97 * all[0], "learns: {all:?}");
}

#[test]
fn a_quantized_full_fine_tune_is_refused() {
    let text = std::fs::read_to_string(common::root().join("recipes/tiny-qlora.toml")).unwrap();
    let full =
        text[..text.find("[lora]").unwrap()].to_string() + &text[text.find("[train]").unwrap()..];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.toml");
    std::fs::write(&path, full).unwrap();
    let e = trainer::recipe::load(&path, &[]).unwrap_err().to_string();
    assert!(e.contains("model.quantize = \"nf4\""), "{e}");
    assert!(e.contains("[lora]"), "{e}");
    let e = trainer::recipe::load(
        &common::root().join("recipes/tiny-qlora.toml"),
        &["model.quantize=\"nf3\"".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.quantize `nf3`") && e.contains("nf4"),
        "{e}"
    );
}

/// `keep` holds a GGUF's quantized projections (and, with `quantize_embeddings`, its
/// embedding table and head) as the file's blocks — dequantized, exactly the file's values
/// — and leaves F32 ones dense; a checkpoint that is not a GGUF is refused. The files cover
/// Q8_0, Q4_0, Q5_0 (q4_k_m's fallback for 128-wide rows), Q4_K and Q6_K (256-wide rows).
#[test]
fn keep_holds_a_gguf_models_own_blocks() {
    use checkpoints::gguf::{ExportType, GgmlType, GgufFile};
    use trainer::model::export_to_gguf;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    base(&path);
    let wide = dir.path().join("wide");
    let spec = NewModel {
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 2,
        init_std: 0.02,
        seed: 4,
        ..Default::default()
    };
    init_model(&wide, &spec, Default::default()).unwrap();
    let device = Device::flex();
    let keep = quant(Quantize::Keep).with_embeddings(true);
    let mut seen = std::collections::BTreeSet::new();
    for (i, (base, ty)) in [
        (&path, ExportType::Q8_0),
        (&path, ExportType::Q4_0),
        (&path, ExportType::Q4KM),
        (&wide, ExportType::Q4KM),
        (&path, ExportType::F32),
    ]
    .into_iter()
    .enumerate()
    {
        let gguf = dir.path().join(format!("{i}-{ty:?}.gguf"));
        export_to_gguf(base, None, &gguf, ty).unwrap();
        let file = GgufFile::open(&gguf).unwrap();
        let (_, dense) = load_model(&gguf, &device).unwrap();
        let (_, kept) = load_model_with(&gguf, &device, &keep).unwrap();
        let weights = |m: &Llama| -> Vec<(String, Weight)> {
            let mut out: Vec<(String, Weight)> = Vec::new();
            for (l, layer) in m.layers.iter().enumerate() {
                for (name, p) in [
                    ("attn_q", &layer.self_attn.q_proj),
                    ("attn_k", &layer.self_attn.k_proj),
                    ("attn_v", &layer.self_attn.v_proj),
                    ("attn_output", &layer.self_attn.o_proj),
                    ("ffn_gate", &layer.mlp.gate_proj),
                    ("ffn_up", &layer.mlp.up_proj),
                    ("ffn_down", &layer.mlp.down_proj),
                ] {
                    out.push((format!("blk.{l}.{name}.weight"), p.weight.clone()));
                }
            }
            out.push(("token_embd.weight".into(), m.embed_tokens.clone()));
            if let Some(h) = &m.lm_head {
                out.push(("output.weight".into(), h.weight.clone()));
            }
            out
        };
        for ((name, d), (_, k)) in weights(&dense).into_iter().zip(weights(&kept)) {
            let source = file.tensor(&name).unwrap().ty;
            let float = matches!(source, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
            match &k {
                Weight::Quantized(_) if !float => {
                    seen.insert(source.name());
                }
                Weight::Dense(_) if float => {}
                _ => panic!("{ty:?}: {name} ({}) held wrongly", source.name()),
            }
            assert_eq!(
                d.dense().into_data(),
                k.dense().into_data(),
                "{ty:?}: {name} ({}): kept weights are the file's values",
                source.name()
            );
        }
        // And the model computes with them.
        let (a, b) = (logits(&dense, &device), logits(&kept, &device));
        assert!(rel_rms(&a, &b) < 1e-5, "{ty:?}: {}", rel_rms(&a, &b));
    }
    let want = ["Q4_0", "Q4_K", "Q5_0", "Q6_K", "Q8_0"];
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), want);
    let e = load_model_with(&path, &device, &keep)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a GGUF"), "{e}");
}

/// `export gguf --type keep` writes every tensor in the type the source GGUF holds it in:
/// from an unchanged model, the very same bytes, under the source's file type and with its
/// `general.*` description.
#[test]
fn export_keep_writes_each_tensor_in_its_source_type() {
    use checkpoints::gguf::{ExportType, GgufFile, GgufWriter, MetaValue, TensorOut};
    use trainer::model::export_to_gguf;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m");
    base(&path);
    let plain = dir.path().join("plain.gguf");
    export_to_gguf(&path, None, &plain, ExportType::Q4_0).unwrap();
    // The same file as a publisher describes it.
    let source = dir.path().join("q4.gguf");
    let p = GgufFile::open(&plain).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &p.metadata {
        if k != "general.name" {
            w.meta(k, v.clone());
        }
    }
    let described = [
        ("general.name", "Tiny Counselor"),
        ("general.license", "apache-2.0"),
        ("general.basename", "tiny"),
    ];
    for (k, v) in described {
        w.meta(k, MetaValue::Str(v.into()));
    }
    for t in &p.tensors {
        w.tensor(TensorOut {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
            bytes: p.bytes(t).to_vec(),
        });
    }
    w.write(&source).unwrap();
    let kept = dir.path().join("kept.gguf");
    export_to_gguf(&source, None, &kept, ExportType::Keep).unwrap();
    let (a, b) = (
        GgufFile::open(&source).unwrap(),
        GgufFile::open(&kept).unwrap(),
    );
    assert_eq!(a.tensors.len(), b.tensors.len());
    for t in &a.tensors {
        let u = b.tensor(&t.name).unwrap();
        assert_eq!((u.ty, &u.dims), (t.ty, &t.dims), "{}", t.name);
        assert_eq!(a.bytes(t), b.bytes(u), "{}: bytes differ", t.name);
    }
    let meta = |f: &GgufFile, k: &str| f.get(k).cloned();
    // Q4_0's llama_ftype, not the F32 of a type-less `keep`.
    assert_eq!(
        meta(&b, "general.file_type").and_then(|v| v.as_f64()),
        Some(2.0)
    );
    for (k, v) in described {
        assert_eq!(meta(&b, k), Some(MetaValue::Str(v.into())), "{k}");
    }
    let e = export_to_gguf(&path, None, &dir.path().join("x.gguf"), ExportType::Keep)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a GGUF"), "{e}");

    // K-quants too, though quantizing their dequantized values again is not the identity
    // (Q4_K's scales are searched for): an untouched tensor keeps its blocks.
    let wide = dir.path().join("wide");
    let spec = NewModel {
        hidden_size: 256,
        intermediate_size: 512,
        init_std: 0.05,
        seed: 5,
        ..Default::default()
    };
    init_model(&wide, &spec, Default::default()).unwrap();
    let km = dir.path().join("km.gguf");
    export_to_gguf(&wide, None, &km, ExportType::Q4KM).unwrap();
    let kept = dir.path().join("km-kept.gguf");
    export_to_gguf(&km, None, &kept, ExportType::Keep).unwrap();
    let (a, b) = (GgufFile::open(&km).unwrap(), GgufFile::open(&kept).unwrap());
    let types: std::collections::BTreeSet<_> = a.tensors.iter().map(|t| t.ty.name()).collect();
    assert!(
        types.contains("Q4_K") && types.contains("Q6_K"),
        "{types:?}"
    );
    for t in &a.tensors {
        let u = b.tensor(&t.name).unwrap();
        assert_eq!(u.ty, t.ty, "{}", t.name);
        assert!(a.bytes(t) == b.bytes(u), "{}: bytes differ", t.name);
    }
}
