//! Generated tokens/s on CPU with the KV cache, for the "small" config (hidden 256, 4
//! layers, vocab 8192): 8 prompts of 32 tokens continued by 64 tokens each, greedy,
//! batched in one call (as GRPO samples) against one prompt at a time, side by side.
//!
//! `cargo bench --bench generate` prints both rates and their ratio.

use std::time::{Duration, Instant};

use burn::tensor::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use rand::SeedableRng;
use trainer::generate::{Sampling, generate_batch};
use trainer::model::load_model;

mod common;
use common::{peak_rss_mib, small_model};

const PROMPTS: usize = 8;
const PROMPT_TOKENS: usize = 32;
const NEW_TOKENS: usize = 64;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    small_model(dir.path());
    let device = Device::flex();
    let (_, model) = load_model(dir.path(), &device).unwrap();
    let prompts: Vec<Vec<u32>> = (0..PROMPTS)
        .map(|r| {
            (0..PROMPT_TOKENS - r)
                .map(|t| ((r * 7919 + t * 104_729) % 8192) as u32)
                .collect()
        })
        .collect();
    let s = Sampling {
        max_new_tokens: NEW_TOKENS,
        ..Default::default()
    };
    let mut rates = Vec::new();
    for (name, batched) in [
        ("generate_batched_8x64", true),
        ("generate_one_at_a_time_8x64", false),
    ] {
        let mut total = Duration::ZERO;
        let mut runs = 0u64;
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
                    if batched {
                        generate_batch(&model, &prompts, &[], &s, &mut rng, &device).unwrap();
                    } else {
                        for p in &prompts {
                            let one = std::slice::from_ref(p);
                            generate_batch(&model, one, &[], &s, &mut rng, &device).unwrap();
                        }
                    }
                }
                let elapsed = start.elapsed();
                total += elapsed;
                runs += iters;
                elapsed
            })
        });
        let per_run = total.as_secs_f64() / runs.max(1) as f64;
        rates.push((PROMPTS * NEW_TOKENS) as f64 / per_run);
    }
    println!(
        "small config: batched {:.0} generated tokens/s, one at a time {:.0} tokens/s \
         (batched ×{:.2}), peak RSS {:.0} MiB",
        rates[0],
        rates[1],
        rates[0] / rates[1],
        peak_rss_mib().unwrap_or(f64::NAN)
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(10));
    targets = bench
}
criterion_main!(benches);
