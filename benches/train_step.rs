//! One LoRA SFT optimizer step (forward, backward, AdamW) on CPU for the fixed "small"
//! config of the SFT issue: hidden 256, intermediate 688, 4 layers, 8 heads / 4 KV heads,
//! vocab 8192, batch 8 × 256 tokens, LoRA r=16 on all seven projections, f32.
//!
//! `cargo bench --bench train_step` prints the step time (criterion), tokens/s, and the
//! process's peak resident memory. The reference stack's figure for the same config is in
//! `../shared/TECH_NOTES.md` (PyTorch + PEFT, 2 threads); compare on the same machine.

use std::time::{Duration, Instant};

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;
use criterion::{Criterion, criterion_group, criterion_main};
use data::batch::Batch;
use data::tokenize::Sequence;
use trainer::batch::LmBatch;
use trainer::model::adapter::attach_lora;
use trainer::model::load_model;

mod common;
use common::{lora_on_all_projections, peak_rss_mib, small_model};
use trainer::objectives::sft::sft_loss;

const BATCH: usize = 8;
const TOKENS: usize = 256;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    small_model(dir.path());
    let device = Device::flex().autodiff();
    device.seed(0);
    let (_, model) = load_model(dir.path(), &device).unwrap();
    let mut model = Some(attach_lora(model, &lora_on_all_projections(), &device).unwrap());
    let seqs: Vec<Sequence> = (0..BATCH)
        .map(|r| Sequence {
            ids: (0..TOKENS)
                .map(|t| ((r * 7919 + t * 104_729) % 8192) as u32)
                .collect(),
            loss_mask: vec![1; TOKENS],
        })
        .collect();
    let batch = LmBatch::new(&Batch::padded(&seqs.iter().collect::<Vec<_>>(), 0), &device);
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let mut total = Duration::ZERO;
    let mut steps = 0u64;
    c.bench_function("lora_sft_step_small_8x256", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let m = model.take().unwrap();
                let (loss, _) = sft_loss(&m, &batch);
                let grads = GradientsParams::from_grads(loss.backward(), &m);
                model = Some(optim.step(1e-4, m, grads));
            }
            let elapsed = start.elapsed();
            total += elapsed;
            steps += iters;
            elapsed
        })
    });
    let per_step = total.as_secs_f64() / steps.max(1) as f64;
    println!(
        "small config: {:.0} ms/step, {:.0} tokens/s, peak RSS {:.0} MiB",
        per_step * 1e3,
        (BATCH * TOKENS) as f64 / per_step,
        peak_rss_mib().unwrap_or(f64::NAN)
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(20));
    targets = bench
}
criterion_main!(benches);
