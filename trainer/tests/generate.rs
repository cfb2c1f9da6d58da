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

/// The greedy token at the end of `seq`, from a full forward without any cache.
fn full_recompute_argmax(model: &trainer::model::Llama, seq: &[u32], device: &Device) -> u32 {
    let n = seq.len();
    let ids: Vec<i64> = seq.iter().map(|&x| x as i64).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), device);
    let mask = Tensor::<2, Int>::from_data(TensorData::new(vec![1i64; n], [1, n]), device);
    let logits = model
        .logits(model.hidden(ids, mask))
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let v = logits.len() / n;
    let last = &logits[(n - 1) * v..n * v];
    (0..v).fold(0, |b, k| if last[k] > last[b] { k } else { b }) as u32
}

/// Prompts of different lengths share one left-padded batch; with greedy decoding every
/// row's tokens are what a full recompute picks at every step, and what the row gets when
/// generated alone. A sliding window shorter than the sequences is in force (Mistral), so
/// left padding must not shift the window.
#[test]
fn batched_greedy_generation_matches_full_recompute() {
    use rand::SeedableRng;
    use trainer::generate::generate_batch;
    let dir = tempfile::tempdir().unwrap();
    let spec = NewModel {
        model_type: checkpoints::ModelType::Mistral,
        init_std: 0.3,
        seed: 5,
        ..Default::default()
    };
    init_model(dir.path(), &spec, Default::default()).unwrap();
    let cfg = dir.path().join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["sliding_window"] = 5.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let device = Device::flex();
    let (_, model) = load_model(dir.path(), &device).unwrap();
    let prompts = vec![
        vec![5u32, 17, 42, 8, 99, 3, 61, 7],
        vec![11u32, 2],
        vec![300u32, 301, 302, 303, 1],
        vec![11u32, 2],
    ];
    let s = Sampling {
        max_new_tokens: 9,
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let batch = generate_batch(&model, &prompts, &[], &s, &mut rng, &device).unwrap();
    assert_eq!(batch.len(), prompts.len());
    for (prompt, got) in prompts.iter().zip(&batch) {
        assert_eq!(got.tokens.len(), 9);
        assert_eq!(got.stop, None, "cut off by max_new_tokens");
        let mut seq = prompt.clone();
        for (step, &token) in got.tokens.iter().enumerate() {
            let want = full_recompute_argmax(&model, &seq, &device);
            assert_eq!(token, want, "prompt {prompt:?}: step {step} diverged");
            seq.push(token);
        }
        assert_eq!(
            generate(&model, prompt, &[], &s, &device).unwrap(),
            got.tokens
        );
    }
    // A stop token ends only the rows that emit it, and is reported, not kept.
    let stop = batch[0].tokens[2];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let stopped = generate_batch(&model, &prompts, &[stop], &s, &mut rng, &device).unwrap();
    assert_eq!(stopped[0].tokens, batch[0].tokens[..2]);
    assert_eq!(stopped[0].stop, Some(stop));
    assert_eq!(stopped[0].trained_tokens(), batch[0].tokens[..3]);
    for (row, full) in stopped.iter().zip(&batch) {
        let cut = full.tokens.iter().position(|&t| t == stop);
        assert_eq!(row.tokens, full.tokens[..cut.unwrap_or(full.tokens.len())]);
    }

    // Sampling: the same prompt repeated gives different rows, and a seed repeats a batch.
    let hot = Sampling {
        max_new_tokens: 12,
        temperature: 1.0,
        ..Default::default()
    };
    let group = vec![prompts[1].clone(); 6];
    let draw = |seed| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        generate_batch(&model, &group, &[], &hot, &mut rng, &device).unwrap()
    };
    let a = draw(1);
    assert_eq!(a, draw(1));
    let distinct: std::collections::HashSet<_> = a.iter().map(|c| c.tokens.clone()).collect();
    assert!(distinct.len() > 1, "six samples were identical");
}

/// GRPO's groups: each prompt runs once and its rows share its KV cache. Greedy, every row of
/// a group is what a full recompute picks at every step; sampled, a seed repeats the whole
/// draw and the rows of one prompt differ.
#[test]
fn grouped_generation_shares_each_prompts_cache() {
    use rand::SeedableRng;
    use trainer::generate::generate_groups;
    let dir = tempfile::tempdir().unwrap();
    let spec = NewModel {
        init_std: 0.3,
        seed: 9,
        ..Default::default()
    };
    init_model(dir.path(), &spec, Default::default()).unwrap();
    let device = Device::flex();
    let (_, model) = load_model(dir.path(), &device).unwrap();
    // Different lengths, so the shared cache carries left padding.
    let prompts = vec![vec![5u32, 17, 42, 8, 99, 3], vec![11u32, 2]];
    let greedy = Sampling {
        max_new_tokens: 7,
        ..Default::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let rows = generate_groups(&model, &prompts, 3, &[], &greedy, &mut rng, &device).unwrap();
    assert_eq!(rows.len(), 6);
    for (r, got) in rows.iter().enumerate() {
        let mut seq = prompts[r / 3].clone();
        assert_eq!(got.tokens.len(), 7);
        for (step, &token) in got.tokens.iter().enumerate() {
            let want = full_recompute_argmax(&model, &seq, &device);
            assert_eq!(token, want, "row {r}: step {step} diverged");
            seq.push(token);
        }
    }
    let hot = Sampling {
        max_new_tokens: 10,
        temperature: 1.0,
        ..Default::default()
    };
    let draw = |seed| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        generate_groups(&model, &prompts, 4, &[], &hot, &mut rng, &device).unwrap()
    };
    let a = draw(3);
    assert_eq!(a, draw(3));
    let first: std::collections::HashSet<_> = a[..4].iter().map(|c| c.tokens.clone()).collect();
    assert!(first.len() > 1, "four samples of one prompt were identical");
}
