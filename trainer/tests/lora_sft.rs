//! LoRA SFT on the bundled dialogues: the loss is the formula, training lowers it, and the
//! adapter saves in PEFT's layout, reloads and merges to identical logits.

mod common;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Tensor};
use common::bundled_batch;
use trainer::batch::LmBatch;
use trainer::model::adapter::{
    LoraSettings, TARGETS, attach_lora, load_adapter, merge_lora, save_adapter,
};
use trainer::model::{Llama, NewModel, init_model, load_model, save_model};
use trainer::objectives::sft::sft_loss;

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec_as::<f32>().unwrap()
}

fn logits(model: &Llama, batch: &LmBatch) -> Vec<f32> {
    host(model.logits(model.hidden_packed(
        batch.ids.clone(),
        batch.positions.clone(),
        batch.segments.clone(),
    )))
}

#[test]
fn lora_sft_learns_and_round_trips_through_peft_files() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = tmp.path().join("base");
    init_model(
        &base_dir,
        &NewModel {
            seed: 3,
            ..Default::default()
        },
        Default::default(),
    )
    .unwrap();
    let batch = bundled_batch(&base_dir, 6, 96);

    // 1. The loss is −mean log p(target) over the assistant's tokens, from full logits.
    let plain = Device::flex();
    let (config, base) = load_model(&base_dir, &plain).unwrap();
    let lm = LmBatch::new(&batch, &plain);
    let (_, metrics) = sft_loss(&base, &lm);
    let full = logits(&base, &lm);
    let v = config.vocab_size;
    let (mut total, mut count) = (0f64, 0usize);
    for r in 0..batch.rows {
        for t in 0..batch.width - 1 {
            let (here, next) = (r * batch.width + t, r * batch.width + t + 1);
            if batch.segments[next] == 1 && batch.loss_mask[next] == 1 {
                let row = &full[here * v..(here + 1) * v];
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&l| (l as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                total += lse - row[batch.ids[next] as usize] as f64;
                count += 1;
            }
        }
    }
    assert!(count > 50, "too few loss tokens: {count}");
    assert_eq!(lm.num_loss_tokens, count);
    assert!(
        (metrics.loss - total / count as f64).abs() < 1e-4,
        "{} vs {}",
        metrics.loss,
        total / count as f64
    );

    // 2. Fresh adapters change nothing; training lowers the loss and leaves the base alone.
    let device = Device::flex().autodiff();
    device.seed(11);
    let (_, model) = load_model(&base_dir, &device).unwrap();
    let settings = LoraSettings {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.0,
        target_modules: TARGETS.map(String::from).to_vec(),
        use_rslora: false,
        layers_to_transform: None,
    };
    let mut model = attach_lora(model, &settings, &device).unwrap();
    let lm = LmBatch::new(&batch, &device);
    let before = logits(&model, &lm);
    let diff = before
        .iter()
        .zip(&full)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-6, "a fresh adapter changed the logits by {diff}");
    let base_q = host(model.layers[0].self_attn.q_proj.dense_weight());

    let mut optim = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.999)
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let mut losses = Vec::new();
    for _ in 0..40 {
        let (loss, m) = sft_loss(&model, &lm);
        losses.push(m.loss);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    // Measured: 6.27 nats (uniform over the 512-token vocab) falls to about 5.2 in 40 steps.
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        last < first - 0.9,
        "loss did not fall: {first} -> {last} ({losses:?})"
    );
    assert!(
        losses.windows(2).filter(|w| w[1] > w[0]).count() <= 4,
        "loss is not falling steadily: {losses:?}"
    );
    assert_eq!(
        host(model.layers[0].self_attn.q_proj.dense_weight()),
        base_q,
        "the frozen base moved"
    );

    let embed_a = host(model.embed_lora.as_ref().unwrap().a.val());
    assert!(
        embed_a.iter().any(|&x| x != 0.0),
        "the embedding adapter (A starts at zero) did not train"
    );

    // The head's adapter is on the log-prob path too (B starts at zero).
    let head_b = host(
        model
            .lm_head
            .as_ref()
            .unwrap()
            .lora
            .as_ref()
            .unwrap()
            .b
            .val(),
    );
    assert!(
        head_b.iter().any(|&x| x != 0.0),
        "the lm_head adapter did not train"
    );

    // 3. PEFT layout: key names, shapes, config keys.
    let adapter_dir = tmp.path().join("adapter");
    save_adapter(&adapter_dir, &model, &settings, "base").unwrap();
    let files = checkpoints::WeightFiles::open_file(&adapter_dir.join("adapter_model.safetensors"))
        .unwrap();
    let a = files
        .get("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        .unwrap();
    assert_eq!(a.shape, &[8, 64]);
    let b = files
        .get("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight")
        .unwrap();
    assert_eq!(b.shape, &[64, 8]);
    let k = files
        .get("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight")
        .unwrap();
    assert_eq!(k.shape, &[32, 8], "k_proj is [Hkv·D, r] under GQA");
    // Seven projections in two layers, the head, and the embeddings (PEFT's bare
    // `lora_embedding_A` [r, vocab] / `lora_embedding_B` [hidden, r]).
    assert_eq!(files.names().count(), 2 * 7 * 2 + 2 + 2);
    assert_eq!(
        files
            .get("base_model.model.model.embed_tokens.lora_embedding_A")
            .unwrap()
            .shape,
        &[8, 512]
    );
    assert_eq!(
        files
            .get("base_model.model.model.embed_tokens.lora_embedding_B")
            .unwrap()
            .shape,
        &[64, 8]
    );
    assert_eq!(
        files
            .get("base_model.model.lm_head.lora_B.weight")
            .unwrap()
            .shape,
        &[512, 8]
    );
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_dir.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "peft_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "task_type",
        "base_model_name_or_path",
        "use_rslora",
        "use_dora",
        "modules_to_save",
        "inference_mode",
    ] {
        assert!(cfg.get(key).is_some(), "adapter_config.json lacks `{key}`");
    }
    assert_eq!(
        (
            cfg["peft_type"].as_str(),
            cfg["task_type"].as_str(),
            cfg["bias"].as_str()
        ),
        (Some("LORA"), Some("CAUSAL_LM"), Some("none"))
    );

    // 4. The adapter reloads onto a fresh base to identical logits.
    let trained = logits(&model, &lm);
    let (_, fresh) = load_model(&base_dir, &device).unwrap();
    let (reloaded, read) = load_adapter(&adapter_dir, fresh, &device).unwrap();
    assert_eq!(read, settings);
    assert_eq!(logits(&reloaded, &lm), trained);

    // 5. A merged checkpoint loads with our loader to the logits of base + adapter.
    let merged = merge_lora(model.valid());
    let merged_dir = tmp.path().join("merged");
    save_model(
        &merged_dir,
        &config,
        &merged,
        config.dtype,
        Default::default(),
    )
    .unwrap();
    let (_, loaded) = load_model(&merged_dir, &plain).unwrap();
    let lm_plain = LmBatch::new(&batch, &plain);
    let got = logits(&loaded, &lm_plain);
    let worst = got
        .iter()
        .zip(&trained)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "merged logits differ by {worst}");
}

/// PEFT's `layers_to_transform`: adapters only on the listed layers (none on the head),
/// trained only there, saved under PEFT's names with the list in the config, reloaded and
/// merged to the same logits; a layer the model lacks is refused by name.
#[test]
fn adapters_on_some_layers_train_there_only_and_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = tmp.path().join("base");
    let shape = NewModel {
        seed: 5,
        num_hidden_layers: 3,
        ..Default::default()
    };
    init_model(&base_dir, &shape, Default::default()).unwrap();
    let batch = bundled_batch(&base_dir, 4, 64);
    let device = Device::flex().autodiff();
    device.seed(2);
    let settings = LoraSettings {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: ["q_proj", "down_proj", "lm_head"]
            .map(String::from)
            .to_vec(),
        use_rslora: false,
        layers_to_transform: Some(vec![0, 2]),
    };
    let (_, base) = load_model(&base_dir, &device).unwrap();
    let mut model = attach_lora(base, &settings, &device).unwrap();
    let on = |m: &Llama, layer: usize| {
        let l = &m.layers[layer];
        (
            l.self_attn.q_proj.lora.is_some(),
            l.self_attn.k_proj.lora.is_some(),
            l.mlp.down_proj.lora.is_some(),
        )
    };
    assert_eq!(on(&model, 0), (true, false, true));
    assert_eq!(on(&model, 1), (false, false, false));
    assert_eq!(on(&model, 2), (true, false, true));
    assert!(
        model.lm_head.as_ref().unwrap().lora.is_none(),
        "the head is in no layer"
    );

    let lm = LmBatch::new(&batch, &device);
    let mut optim = AdamWConfig::new().init();
    for _ in 0..3 {
        let (loss, _) = sft_loss(&model, &lm);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    let b = host(model.layers[2].mlp.down_proj.lora.as_ref().unwrap().b.val());
    assert!(
        b.iter().any(|&x| x != 0.0),
        "layer 2's adapter did not train"
    );

    let dir = tmp.path().join("adapter");
    save_adapter(&dir, &model, &settings, "base").unwrap();
    let files =
        checkpoints::WeightFiles::open_file(&dir.join("adapter_model.safetensors")).unwrap();
    let mut names: Vec<_> = files.names().map(String::from).collect();
    names.sort();
    let key = |layer: usize, module: &str, f: &str| {
        format!("base_model.model.model.layers.{layer}.{module}.lora_{f}.weight")
    };
    let mut want = Vec::new();
    for layer in [0, 2] {
        for module in ["mlp.down_proj", "self_attn.q_proj"] {
            want.extend(["A", "B"].map(|f| key(layer, module, f)));
        }
    }
    want.sort();
    assert_eq!(names, want);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["layers_to_transform"], serde_json::json!([0, 2]));

    let trained = logits(&model, &lm);
    let (_, fresh) = load_model(&base_dir, &device).unwrap();
    let (reloaded, read) = load_adapter(&dir, fresh, &device).unwrap();
    assert_eq!(read, settings);
    assert_eq!(on(&reloaded, 1), (false, false, false));
    assert_eq!(logits(&reloaded, &lm), trained);
    let merged = logits(
        &merge_lora(reloaded.valid()),
        &LmBatch::new(&batch, &Device::flex()),
    );
    let worst = merged
        .iter()
        .zip(&trained)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "merged logits differ by {worst}");

    // A model with fewer layers than the list names is refused, by file and layer.
    let small_dir = tmp.path().join("small");
    let two = NewModel {
        num_hidden_layers: 2,
        ..shape
    };
    init_model(&small_dir, &two, Default::default()).unwrap();
    let (_, small) = load_model(&small_dir, &device).unwrap();
    let e = load_adapter(&dir, small.clone(), &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("adapter_config.json") && e.contains("names layer 2, but the model has 2"),
        "{e}"
    );
    let e = attach_lora(small, &settings, &device)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora: `layers_to_transform` names layer 2"),
        "{e}"
    );
}
