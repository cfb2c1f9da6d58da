//! Half-precision compute (`train.bf16` / `train.fp16`): logits of the transformers
//! fixtures within half-precision tolerance, frozen weights stored in the half dtype while
//! adapters stay f32, and LoRA SFT in bf16 following the f32 run's loss curve.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use checkpoints::WeightFiles;
use trainer::model::load_model;
use trainer::model::precision::Precision;
use trainer::model::with_precision;
use trainer::recipe::load;
use trainer::train::train;

mod common;
use common::{losses, root};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/parity")
        .join(name)
}

/// The largest logit error over real tokens, relative to the largest reference logit.
fn relative_logit_error(name: &str, precision: Precision, device: &Device) -> f32 {
    let dir = fixture(name);
    let f = WeightFiles::open_file(&dir.join("cases.safetensors")).unwrap();
    let ids = f.get("input_ids").unwrap();
    let [b, t] = [ids.shape[0], ids.shape[1]];
    let ids = ids.to_i64().unwrap();
    let mask = f.get("attention_mask").unwrap().to_i64().unwrap();
    let reference = f.get("logits").unwrap();
    let v = reference.shape[2];
    let reference = reference.to_f32().unwrap();
    let (_, model) = load_model(&dir, device).unwrap();
    let model = with_precision(model, precision);
    let ids_t = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, t]), device);
    let mask_t = Tensor::<2, Int>::from_data(TensorData::new(mask.clone(), [b, t]), device);
    let hidden = model.hidden(ids_t, mask_t);
    // The head is read in its stored dtype (a half-precision head is never widened whole
    // to f32, which at vocab 128 256 would be a transient of V·H·4 bytes).
    let head = model.head(&hidden.clone().reshape([b * t, hidden.dims()[2]]));
    let kernels::HeadWeight::Dense(weight) = &head.weight else {
        panic!("{name}: the head is dense without model.quantize_embeddings");
    };
    assert_eq!(weight.dtype(), precision.dtype(), "{name}: head dtype");
    let logits = model.logits(hidden);
    assert_eq!(logits.dtype(), DType::F32, "logits leave the model in f32");
    let ours = logits.into_data().try_into_vec_as::<f32>().unwrap();
    let (mut worst, mut scale) = (0f32, 0f32);
    for (pos, &m) in mask.iter().enumerate() {
        if m == 0 {
            continue;
        }
        for k in 0..v {
            let i = pos * v + k;
            assert!(ours[i].is_finite(), "{name}: non-finite logit");
            worst = worst.max((ours[i] - reference[i]).abs());
            scale = scale.max(reference[i].abs());
        }
    }
    worst / scale
}

/// Tolerance of the half-precision logits, relative to the largest logit. f16 keeps 11
/// significant bits (unit roundoff 4.9e-4): 1e-2. bf16 keeps 8 (3.9e-3), and every weight
/// and activation is rounded to it (an f32 checkpoint's weights included), a few times per
/// layer: 3e-2 (measured here: 1.1e-2 on the f32 fixture).
fn tolerance(p: Precision) -> f32 {
    match p {
        Precision::Bf16 => 3e-2,
        _ => 1e-2,
    }
}

#[test]
fn half_precision_logits_match_transformers_within_tolerance() {
    for name in ["tiny-llama-f32", "tiny-llama-bf16"] {
        let f32_error = relative_logit_error(name, Precision::F32, &Device::flex());
        for p in [Precision::Bf16, Precision::F16] {
            let e = relative_logit_error(name, p, &Device::flex());
            eprintln!("{name} {p:?} on flex: relative error {e:e} (f32: {f32_error:e})");
            assert!(e < tolerance(p), "{name} {p:?}: {e}");
            // Half precision really was used: it is further off than f32.
            assert!(e > f32_error, "{name} {p:?}: {e} vs f32 {f32_error}");
        }
    }
    // lavapipe has f16 but not bf16.
    #[cfg(feature = "wgpu")]
    {
        let wgpu = Device::wgpu(burn::tensor::DeviceKind::DefaultDevice);
        for name in ["tiny-llama-f32", "tiny-llama-bf16"] {
            let e = relative_logit_error(name, Precision::F16, &wgpu);
            eprintln!("{name} F16 on wgpu: relative error {e:e}");
            assert!(e < tolerance(Precision::F16), "{name} F16 on wgpu: {e}");
        }
    }
}

/// Attention takes the activations' dtype, as SDPA does under mixed precision, so a bf16
/// model's KV cache holds bf16 (half the bytes of a rollout's cache), and decoding through
/// it token by token gives the whole sequence's forward.
#[test]
fn a_bf16_models_kv_cache_is_bf16_and_decodes_as_the_full_pass() {
    let device = Device::flex();
    let (_, model) = load_model(&fixture("tiny-llama-bf16"), &device).unwrap();
    let model = with_precision(model, Precision::Bf16);
    let ids: Vec<i64> = vec![1, 17, 42, 5, 99, 3, 64, 8];
    let t = ids.len();
    let ints =
        |v: Vec<i64>, n: usize| Tensor::<2, Int>::from_data(TensorData::new(v, [1, n]), &device);
    let full = model.hidden(ints(ids.clone(), t), ints(vec![1; t], t));
    let full = full.into_data().try_into_vec_as::<f32>().unwrap();
    let mut cache = None;
    let mut stepped = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let padding = Tensor::<2, burn::tensor::Bool>::from_data(
            TensorData::new(vec![false], [1, 1]),
            &device,
        );
        let (h, c) =
            model.hidden_cached(ints(vec![id], 1), ints(vec![i as i64], 1), padding, cache);
        for layer in &c.layers {
            assert_eq!(
                (layer.k.dtype(), layer.v.dtype()),
                (DType::BF16, DType::BF16)
            );
        }
        stepped.extend(h.into_data().try_into_vec_as::<f32>().unwrap());
        cache = Some(c);
    }
    let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    let worst = full
        .iter()
        .zip(&stepped)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // Both run in bf16 but with other shapes (and so other roundings): a few bf16 ulps.
    assert!(
        worst <= 3e-2 * scale,
        "cached {worst} vs full, scale {scale}"
    );
}

/// The dtypes of the trained model's parameters: (frozen, trainable) dtype sets.
fn dtypes(model: &trainer::model::Llama) -> (Vec<DType>, Vec<DType>) {
    struct Seen(Vec<DType>, Vec<DType>);
    impl ModuleVisitor for Seen {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let d = param.val().dtype();
            let list = if param.is_require_grad() {
                &mut self.1
            } else {
                &mut self.0
            };
            if !list.contains(&d) {
                list.push(d);
            }
        }
    }
    let mut s = Seen(Vec::new(), Vec::new());
    model.visit(&mut s);
    (s.0, s.1)
}

#[test]
fn bf16_lora_sft_keeps_f32_adapters_and_follows_the_f32_run() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let sets = |extra: &str| {
        vec![
            format!("model.path=\"{}\"", base.display()),
            format!(
                "data.train=\"{}\"",
                root().join("data/examples/counseling-sft.jsonl").display()
            ),
            "train.max_steps=12".into(),
            "train.eval_steps=0".into(),
            extra.to_string(),
        ]
    };
    let recipe_path = root().join("recipes/tiny-sft.toml");
    let f32_dir = tmp.path().join("f32");
    let recipe = load(&recipe_path, &sets("train.bf16=false")).unwrap();
    train(&recipe, &f32_dir, false, false).unwrap();
    let bf16_dir = tmp.path().join("bf16");
    let recipe = load(&recipe_path, &sets("train.bf16=true")).unwrap();
    let outcome = train(&recipe, &bf16_dir, false, false).unwrap();

    // Frozen weights in bf16, adapters in f32.
    let objective = trainer::objectives::registry::for_recipe(&recipe).unwrap();
    let device = Device::flex().autodiff();
    let setup = trainer::train::setup(&recipe, objective.as_ref(), &device, None, 0).unwrap();
    let (frozen, trainable) = dtypes(&setup.model);
    assert_eq!(frozen, vec![DType::BF16]);
    assert_eq!(trainable, vec![DType::F32]);

    let (a, b) = (losses(&f32_dir), losses(&bf16_dir));
    assert_eq!(b.len(), 12);
    eprintln!("f32 {a:?}\nbf16 {b:?}");
    assert!(b.iter().all(|l| l.is_finite()));
    assert!(
        (a[0] - b[0]).abs() < 1e-2 * a[0],
        "first loss {} vs {}",
        a[0],
        b[0]
    );
    assert!(
        outcome.last_loss < 0.7 * outcome.first_loss,
        "bf16 loss did not fall: {b:?}"
    );
    let last = |v: &[f64]| v[v.len() - 3..].iter().sum::<f64>() / 3.0;
    assert!(
        (last(&a) - last(&b)).abs() < 0.1 * last(&a),
        "bf16 ends at {} where f32 ends at {}",
        last(&b),
        last(&a)
    );
    // The saved adapter is f32, as PEFT keeps it.
    let files = WeightFiles::open_file(&bf16_dir.join("final/adapter_model.safetensors")).unwrap();
    let name = files.names().next().unwrap().to_string();
    assert_eq!(format!("{:?}", files.get(&name).unwrap().dtype), "F32");
}
