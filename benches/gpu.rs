//! The figures of BENCHMARKS.md, hearth's side: one measurement per process, printed as
//! one JSON line, so a supervising script (`benches/gpu/run.sh`) can sample the GPU's
//! memory around each and set it beside PyTorch's (`benches/gpu/torch_ops.py`) from the
//! same machine in the same run.
//!
//! `cargo bench --bench gpu --features cuda -- OP PATH [--small]`, with
//! `HEARTH_BENCH_DEVICE=cuda` (default `cpu`), where
//! - `OP` is `attention` (Llama-3.2-1B's: 32 query heads on 8 K/V heads of 64, causal,
//!   4 × 2048 tokens; `attention128`: 16 heads on 4 of 128), `linear_ce` (8192 tokens of
//!   hidden 2048 through a head of vocab 128 256: the per-token log-probs and the hidden
//!   and head gradients), or `lora_sft` (one LoRA SFT step, r 16 on all seven projections,
//!   on a random Llama-3.2-1B-shaped model, 2048 tokens, bf16 compute), or `rollout`
//!   (GRPO's sampling on that model: 8 completions of 256 tokens for one prompt, batched);
//! - `PATH` is `fused`, `blocked` (fused, with attention a block of queries at a time
//!   through the backend's matmuls instead of the flash kernel: `train.attention`), or
//!   `reference`;
//! - `--small` shrinks every shape so the harness itself can be checked on a CPU.
//!
//! Timings synchronise on the device by reading one value back, after warm-up runs that
//! pay for kernel compilation and autotuning. FLOP counts follow FlashAttention's
//! convention: a causal forward is `2·B·H·T²·D` (half of the dense `4·B·H·T²·D`), its
//! backward 2.5 times the forward.

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use checkpoints::ModelConfig;
use data::batch::Batch;
use data::tokenize::Sequence;
use kernels::{AttentionPath, Head, Kernels, fused, reference, set_attention_path, set_kernels};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use trainer::batch::LmBatch;
use trainer::generate::{Sampling, generate_batch};
use trainer::model::Llama;
use trainer::model::adapter::attach_lora;
use trainer::model::precision::Precision;
use trainer::model::with_precision;
use trainer::model::{init_random_weights, load_model};
use trainer::objectives::sft::sft_loss;

mod common;
use common::{device, filled, lora_on_all_projections};

const WARMUP: usize = 3;
const RUNS: usize = 10;

/// Waits for the device: a value is only back once every op before it ran.
fn settle<const D: usize>(t: Tensor<D>) {
    std::hint::black_box(t.sum().into_scalar::<f32>());
}

/// Mean seconds of `f` over [`RUNS`] runs, after [`WARMUP`] untimed ones.
fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let start = Instant::now();
    for _ in 0..RUNS {
        f();
    }
    start.elapsed().as_secs_f64() / RUNS as f64
}

fn attention(fused_path: bool, small: bool, d: usize) -> serde_json::Value {
    let (b, t) = if small { (1, 128) } else { (4, 2048) };
    let heads = if small { 4 } else { 2048 / d };
    let kv_heads = heads / 4;
    let plain = device();
    let ad = plain.clone().autodiff();
    let attend = |q, k, v, m| {
        if fused_path {
            fused::attention(q, k, v, m)
        } else {
            reference::attention(q, k, v, m)
        }
    };
    let causal = |device: &Device| {
        let m: Vec<bool> = (0..b * t * t).map(|n| n % t > (n / t) % t).collect();
        Tensor::<4, Bool>::from_data(TensorData::new(m, [b, 1, t, t]), device)
    };
    let inputs = |device: &Device| {
        (
            filled([b, heads, t, d], 29, device),
            filled([b, kv_heads, t, d], 31, device),
            filled([b, kv_heads, t, d], 37, device),
        )
    };
    let (q, k, v) = inputs(&plain);
    let mask = causal(&plain);
    let forward = time(|| settle(attend(q.clone(), k.clone(), v.clone(), mask.clone())));
    let mask_ad = causal(&ad);
    let both = time(|| {
        let (q, k, v) = inputs(&ad);
        let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
        let grads = attend(q.clone(), k.clone(), v.clone(), mask_ad.clone())
            .sum()
            .backward();
        settle(q.grad(&grads).expect("dq"));
    });
    let flops = 2.0 * (b * heads * t * t * d) as f64;
    json!({
        "shape": format!("B {b}, H {heads}/{kv_heads}, T {t}, D {d}, causal, f32"),
        "forward_ms": forward * 1e3,
        "forward_backward_ms": both * 1e3,
        "forward_tflops": flops / forward / 1e12,
        "forward_backward_tflops": 3.5 * flops / both / 1e12,
    })
}

fn linear_ce(fused_path: bool, small: bool) -> serde_json::Value {
    let (n, h, vocab) = if small {
        (256, 64, 4096)
    } else {
        (8192, 2048, 128_256)
    };
    let ad = device().autodiff();
    let targets: Vec<i64> = (0..n as i64).map(|i| (i * 7919) % vocab as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &ad);
    let weight = filled([vocab, h], 17, &ad).mul_scalar(0.1).require_grad();
    let step = || {
        let hidden = filled([n, h], 13, &ad).require_grad();
        let head = Head::new(weight.clone());
        let lp = if fused_path {
            fused::token_logprobs(hidden.clone(), &head, targets.clone(), 1024).logprobs
        } else {
            // What an unfused stack does: the full [tokens, vocab] logits at once.
            reference::token_logprobs(hidden.clone(), &head, targets.clone(), n).logprobs
        };
        let grads = lp.neg().mean().backward();
        settle(hidden.grad(&grads).expect("dh"));
        settle(weight.grad(&grads).expect("dW"));
    };
    json!({
        "shape": format!("{n} tokens, hidden {h}, vocab {vocab}, f32, head trained"),
        "forward_backward_ms": time(step) * 1e3,
    })
}

/// A random model of Llama-3.2-1B's shape (a tiny one with `small`), written to `dir` and
/// loaded on `device`.
fn random_llama(small: bool, dir: &std::path::Path, device: &Device) -> (ModelConfig, Llama) {
    let config = if small {
        json!({"model_type": "llama", "vocab_size": 4096, "hidden_size": 128,
               "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
               "tie_word_embeddings": true, "torch_dtype": "bfloat16"})
    } else {
        // Llama-3.2-1B's shape.
        json!({"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
               "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "tie_word_embeddings": true,
               "torch_dtype": "bfloat16"})
    };
    let config = ModelConfig::from_json_str(&config.to_string(), &dir.join("config.json"))
        .expect("the bench's config");
    checkpoints::save_weights(
        dir,
        &init_random_weights(&config, 0.02, 0),
        checkpoints::SaveOptions::default(),
    )
    .expect("random weights");
    checkpoints::write_text(&dir.join("config.json"), &config.to_json(config.dtype))
        .expect("config.json");
    device.seed(0);
    let (_, model) = load_model(dir, device).expect("the random model");
    (config, model)
}

fn lora_sft(fused_path: bool, small: bool) -> serde_json::Value {
    set_kernels(if fused_path {
        Kernels::Fused
    } else {
        Kernels::Reference
    });
    let tokens = if small { 256 } else { 2048 };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let device = device().autodiff();
    let (config, model) = random_llama(small, dir.path(), &device);
    let model = attach_lora(model, &lora_on_all_projections(), &device).expect("adapters");
    let mut model = Some(with_precision(model, Precision::Bf16));
    let vocab = config.vocab_size;
    let seq = Sequence {
        ids: (0..tokens)
            .map(|t| ((t * 104_729) % vocab) as u32)
            .collect(),
        loss_mask: vec![1; tokens],
    };
    let batch = LmBatch::new(&Batch::padded(&[&seq], 0), &device);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut loss_value = 0.0;
    let step = time(|| {
        let m = model.take().expect("the model between steps");
        let (loss, _) = sft_loss(&m, &batch);
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        model = Some(optim.step(1e-4, m, grads));
        loss_value = loss.into_scalar::<f32>();
    });
    json!({
        "shape": format!("Llama-3.2-1B-shaped{}, 1 × {tokens} tokens, LoRA r 16 on 7 projections, bf16",
                         if small { " (small)" } else { "" }),
        "step_ms": step * 1e3,
        "tokens_per_second": tokens as f64 / step,
        "last_loss": loss_value,
    })
}

/// GRPO's rollout: G = 8 sampled completions of one prompt, batched, with the KV cache,
/// in bf16, never stopping early (no stop token), as `num_return_sequences = 8`.
fn rollout(fused_path: bool, small: bool) -> serde_json::Value {
    set_kernels(if fused_path {
        Kernels::Fused
    } else {
        Kernels::Reference
    });
    let (prompt_len, new_tokens, g) = if small { (16, 32, 8) } else { (64, 256, 8) };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let device = device();
    let (config, model) = random_llama(small, dir.path(), &device);
    let model = with_precision(model, Precision::Bf16);
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|t| ((t * 104_729) % config.vocab_size) as u32)
        .collect();
    let prompts = vec![prompt; g];
    let sampling = Sampling {
        max_new_tokens: new_tokens,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
    let mut generated = 0;
    // Fewer runs than the kernels': one rollout is already hundreds of decode steps.
    let once = |generated: &mut usize| {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let out = generate_batch(&model, &prompts, &[], &sampling, &mut rng, &device)
            .expect("the rollout");
        *generated = out.iter().map(|c| c.tokens.len()).sum();
    };
    once(&mut generated);
    let start = Instant::now();
    const ROLLOUTS: usize = 3;
    for _ in 0..ROLLOUTS {
        once(&mut generated);
    }
    let seconds = start.elapsed().as_secs_f64() / ROLLOUTS as f64;
    json!({
        "shape": format!("Llama-3.2-1B-shaped{}, {g} × {new_tokens} new tokens after {prompt_len}, sampled, bf16",
                         if small { " (small)" } else { "" }),
        "rollout_ms": seconds * 1e3,
        "tokens_per_second": generated as f64 / seconds,
    })
}

fn main() {
    // cargo bench passes `--bench`; the rest are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let small = args.iter().any(|a| a == "--small");
    let words: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (Some(op), Some(path)) = (words.first(), words.get(1)) else {
        eprintln!(
            "usage: gpu OP PATH [--small]; OP: attention, attention128, linear_ce, lora_sft, rollout; PATH: fused, blocked, reference"
        );
        std::process::exit(2);
    };
    let fused_path = match *path {
        "fused" => true,
        "reference" => false,
        // The fused ops with attention through the backend's matmuls, a block of queries at
        // a time (`train.attention = "blocked"`), where `fused` runs the flash kernel.
        "blocked" => {
            set_attention_path(AttentionPath::Blocked);
            true
        }
        other => {
            eprintln!("PATH must be fused, blocked or reference, not {other}");
            std::process::exit(2);
        }
    };
    let result = match *op {
        "attention" => attention(fused_path, small, 64),
        "attention128" => attention(fused_path, small, 128),
        "linear_ce" => linear_ce(fused_path, small),
        "lora_sft" => lora_sft(fused_path, small),
        "rollout" => rollout(fused_path, small),
        other => {
            eprintln!("unknown OP {other}");
            std::process::exit(2);
        }
    };
    let mut line = json!({"side": "hearth", "op": op, "path": path});
    if let (Some(line), Some(result)) = (line.as_object_mut(), result.as_object()) {
        line.extend(result.clone());
    }
    println!("{line}");
}
