//! Generation with the KV cache computes what a full forward computes.

use burn::tensor::{Device, Int, Tensor, TensorData};
use trainer::generate::{Sampling, generate};
use trainer::model::{NewModel, init_model, load_model};

#[test]
fn cached_generation_matches_full_recomputation() {
    let dir = tempfile::tempdir().unwrap();
    for (i, model_type) in [
        checkpoints::ModelType::Llama,
        checkpoints::ModelType::Mistral,
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("m{i}"));
        let spec = NewModel {
            model_type,
            init_std: 0.3,
            seed: 21,
            ..Default::default()
        };
        init_model(&path, &spec, Default::default()).unwrap();
        if model_type == checkpoints::ModelType::Mistral {
            // A window shorter than the sequence, so the cached mask must apply it.
            let cfg = path.join("config.json");
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
            v["sliding_window"] = 4.into();
            std::fs::write(&cfg, v.to_string()).unwrap();
        }
        let device = Device::flex();
        let (config, model) = load_model(&path, &device).unwrap();
        let prompt = vec![5u32, 17, 42, 8, 99, 3];
        let s = Sampling {
            max_new_tokens: 10,
            ..Default::default()
        };
        let cached = generate(&model, &prompt, &[], &s, &device).unwrap();
        assert_eq!(cached.len(), 10);

        // Recompute everything each step, greedily, and compare logits too.
        let mut seq = prompt.clone();
        let v = config.vocab_size;
        for &token in &cached {
            let n = seq.len();
            let ids: Vec<i64> = seq.iter().map(|&x| x as i64).collect();
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
            let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; n], [1, n]), &device);
            let logits = model
                .logits(model.hidden(ids, mask))
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap();
            let last = &logits[(n - 1) * v..n * v];
            let best = (0..v).fold(0, |b, k| if last[k] > last[b] { k } else { b });
            assert_eq!(
                best as u32, token,
                "{model_type:?}: cached greedy diverged at length {n}"
            );
            seq.push(token);
        }

        // A stop token ends generation before it is emitted.
        let stopped = generate(&model, &prompt, &[cached[3]], &s, &device).unwrap();
        assert_eq!(stopped, cached[..3]);
    }
}
