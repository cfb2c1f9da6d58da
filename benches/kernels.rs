//! Every fused op against its reference, side by side, forward and forward + backward, on
//! the "small" config's shapes (2048 tokens = 8 × 256, hidden 256, intermediate 688,
//! vocab 8192), then the peak memory of the head log-probs (op 2) at Llama 3's vocabulary
//! of 128 256 (run alone with `cargo bench --bench kernels -- peak`).
//!
//! `cargo bench --bench kernels` runs on the CPU (flex); `HEARTH_BENCH_DEVICE=wgpu` (or
//! `cuda`) with the matching `--features` runs the CubeCL kernels. Criterion prints each
//! pair's times; their ratio is the claim, never one absolute figure. The memory figures
//! are host allocations (a counting allocator), so they are measured on flex.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use kernels::{Head, fused, reference};

mod common;
use common::{device, filled};

struct Counting;

static NOW: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = NOW.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NOW.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TOKENS: usize = 2048;
const HIDDEN: usize = 256;
const INTERMEDIATE: usize = 688;
const VOCAB: usize = 8192;
const CHUNK: usize = 1024;
const RANK: usize = 16;
/// The small config's attention: 8 sequences of 256, 8 query heads on 4 K/V heads of 32.
const BATCH: usize = 8;
const SEQ: usize = 256;
const HEADS: usize = 8;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = 32;

fn targets(n: usize, vocab: usize, device: &Device) -> Tensor<1, Int> {
    let t: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % vocab as i64).collect();
    Tensor::from_data(TensorData::new(t, [n]), device)
}

/// Waits for the device: a tensor's data is only there once every op before it ran.
fn settle<const D: usize>(t: Tensor<D>) {
    black_box(t.sum().into_scalar::<f32>());
}

fn bench_ops(c: &mut Criterion) {
    let plain = device();
    let ad = plain.clone().autodiff();
    for (path, is_fused) in [("fused", true), ("reference", false)] {
        let rms = |x: Tensor<2>, w: Tensor<1>| {
            if is_fused {
                fused::rms_norm(x, w, 1e-5)
            } else {
                reference::rms_norm(x, w, 1e-5)
            }
        };
        let swiglu = |g: Tensor<2>, u: Tensor<2>| {
            if is_fused {
                fused::swiglu(g, u)
            } else {
                reference::swiglu(g, u)
            }
        };
        let logprobs = |h: Tensor<2>, head: &Head, t: Tensor<1, Int>| {
            if is_fused {
                fused::token_logprobs(h, head, t, CHUNK).logprobs
            } else {
                reference::token_logprobs(h, head, t, CHUNK).logprobs
            }
        };

        let x = filled([TOKENS, HIDDEN], 3, &plain);
        let w = filled([HIDDEN], 5, &plain);
        c.bench_function(&format!("rms_norm/{path}/forward"), |b| {
            b.iter(|| settle(rms(x.clone(), w.clone())))
        });
        c.bench_function(&format!("rms_norm/{path}/forward+backward"), |b| {
            b.iter(|| {
                let x = filled([TOKENS, HIDDEN], 3, &ad).require_grad();
                let w = filled([HIDDEN], 5, &ad).require_grad();
                let grads = rms(x.clone(), w).sum().backward();
                settle(x.grad(&grads).expect("dx"));
            })
        });

        let g = filled([TOKENS, INTERMEDIATE], 7, &plain);
        let u = filled([TOKENS, INTERMEDIATE], 11, &plain);
        c.bench_function(&format!("swiglu/{path}/forward"), |b| {
            b.iter(|| settle(swiglu(g.clone(), u.clone())))
        });
        c.bench_function(&format!("swiglu/{path}/forward+backward"), |b| {
            b.iter(|| {
                let g = filled([TOKENS, INTERMEDIATE], 7, &ad).require_grad();
                let u = filled([TOKENS, INTERMEDIATE], 11, &ad).require_grad();
                let grads = swiglu(g.clone(), u).sum().backward();
                settle(g.grad(&grads).expect("d_gate"));
            })
        });

        let rope = |x: Tensor<4>, cos: Tensor<3>, sin: Tensor<3>| {
            if is_fused {
                fused::rotary(x, cos, sin)
            } else {
                reference::rotary(x, cos, sin)
            }
        };
        let cos = filled([BATCH, SEQ, HEAD_DIM], 19, &plain);
        let sin = filled([BATCH, SEQ, HEAD_DIM], 23, &plain);
        let q = filled([BATCH, HEADS, SEQ, HEAD_DIM], 29, &plain);
        c.bench_function(&format!("rotary/{path}/forward"), |b| {
            b.iter(|| settle(rope(q.clone(), cos.clone(), sin.clone())))
        });
        let (cos_ad, sin_ad) = (
            filled([BATCH, SEQ, HEAD_DIM], 19, &ad),
            filled([BATCH, SEQ, HEAD_DIM], 23, &ad),
        );
        c.bench_function(&format!("rotary/{path}/forward+backward"), |b| {
            b.iter(|| {
                let q = filled([BATCH, HEADS, SEQ, HEAD_DIM], 29, &ad).require_grad();
                let grads = rope(q.clone(), cos_ad.clone(), sin_ad.clone())
                    .sum()
                    .backward();
                settle(q.grad(&grads).expect("dq"));
            })
        });

        let attend = |q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, m: Tensor<4, Bool>| {
            if is_fused {
                fused::attention(q, k, v, m)
            } else {
                reference::attention(q, k, v, m)
            }
        };
        let causal = |device: &Device| {
            let m: Vec<bool> = (0..BATCH * SEQ * SEQ)
                .map(|n| n % SEQ > (n / SEQ) % SEQ)
                .collect();
            Tensor::<4, Bool>::from_data(TensorData::new(m, [BATCH, 1, SEQ, SEQ]), device)
        };
        let (k, v, mask) = (
            filled([BATCH, KV_HEADS, SEQ, HEAD_DIM], 31, &plain),
            filled([BATCH, KV_HEADS, SEQ, HEAD_DIM], 37, &plain),
            causal(&plain),
        );
        c.bench_function(&format!("attention/{path}/forward"), |b| {
            b.iter(|| settle(attend(q.clone(), k.clone(), v.clone(), mask.clone())))
        });
        let mask_ad = causal(&ad);
        c.bench_function(&format!("attention/{path}/forward+backward"), |b| {
            b.iter(|| {
                let q = filled([BATCH, HEADS, SEQ, HEAD_DIM], 29, &ad).require_grad();
                let k = filled([BATCH, KV_HEADS, SEQ, HEAD_DIM], 31, &ad).require_grad();
                let v = filled([BATCH, KV_HEADS, SEQ, HEAD_DIM], 37, &ad).require_grad();
                let out = attend(q.clone(), k.clone(), v.clone(), mask_ad.clone());
                let grads = out.sum().backward();
                settle(q.grad(&grads).expect("dq"));
            })
        });

        // LoRA's up-projection of rank 16 into a [TOKENS, INTERMEDIATE] projection output.
        let lora = |base: Tensor<2>, down: Tensor<2>, up: Tensor<2>| {
            if is_fused {
                fused::lora_up(base, down, up, 2.0)
            } else {
                reference::lora_up(base, down, up, 2.0)
            }
        };
        let base = filled([TOKENS, INTERMEDIATE], 41, &plain);
        let down = filled([TOKENS, RANK], 43, &plain);
        let up = filled([INTERMEDIATE, RANK], 47, &plain);
        c.bench_function(&format!("lora_up/{path}/forward"), |b| {
            b.iter(|| settle(lora(base.clone(), down.clone(), up.clone())))
        });
        let base_ad = filled([TOKENS, INTERMEDIATE], 41, &ad);
        c.bench_function(&format!("lora_up/{path}/forward+backward"), |b| {
            b.iter(|| {
                let down = filled([TOKENS, RANK], 43, &ad).require_grad();
                let up = filled([INTERMEDIATE, RANK], 47, &ad).require_grad();
                let grads = lora(base_ad.clone(), down.clone(), up.clone())
                    .sum()
                    .backward();
                settle(up.grad(&grads).expect("d_b"));
            })
        });

        let h = filled([TOKENS, HIDDEN], 13, &plain);
        let head = Head::new(filled([VOCAB, HIDDEN], 17, &plain));
        let t = targets(TOKENS, VOCAB, &plain);
        c.bench_function(&format!("token_logprobs/{path}/forward"), |b| {
            b.iter(|| settle(logprobs(h.clone(), &head, t.clone())))
        });
        let head_ad = Head::new(filled([VOCAB, HIDDEN], 17, &ad));
        let t_ad = targets(TOKENS, VOCAB, &ad);
        c.bench_function(&format!("token_logprobs/{path}/forward+backward"), |b| {
            b.iter(|| {
                let h = filled([TOKENS, HIDDEN], 13, &ad).require_grad();
                let grads = logprobs(h.clone(), &head_ad, t_ad.clone()).sum().backward();
                settle(h.grad(&grads).expect("dh"));
            })
        });
    }
}

/// Peak host bytes above the inputs of one forward + backward of the head log-probs at
/// vocab 128 256 (4096 tokens, hidden 256, chunks of 512, head frozen as under LoRA).
fn logprob_peak_at_llama3_vocab(_c: &mut Criterion) {
    const V: usize = 128_256;
    const N: usize = 4096;
    const CHUNK: usize = 512;
    let device = Device::flex().autodiff();
    let head = Head::new(filled([V, HIDDEN], 17, &device));
    let t = targets(N, V, &device);
    let mut peaks = Vec::new();
    for is_fused in [true, false] {
        let h = filled([N, HIDDEN], 13, &device).require_grad();
        let start = NOW.load(Ordering::Relaxed);
        PEAK.store(start, Ordering::Relaxed);
        let lp = if is_fused {
            fused::token_logprobs(h.clone(), &head, t.clone(), CHUNK).logprobs
        } else {
            reference::token_logprobs(h.clone(), &head, t.clone(), CHUNK).logprobs
        };
        let grads = lp.sum().backward();
        settle(h.grad(&grads).expect("dh"));
        peaks.push((PEAK.load(Ordering::Relaxed) - start) as f64 / (1 << 20) as f64);
    }
    let logits = (N * V * 4) as f64 / (1 << 20) as f64;
    println!(
        "token_logprobs peak at vocab {V} ({N} tokens, chunk {CHUNK}): fused {:.0} MiB, \
         reference {:.0} MiB ([N, V] f32 logits alone: {logits:.0} MiB)",
        peaks[0], peaks[1]
    );
}

criterion_group!(benches, bench_ops, logprob_peak_at_llama3_vocab);
criterion_main!(benches);
