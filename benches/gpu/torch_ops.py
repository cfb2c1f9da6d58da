"""PyTorch's side of BENCHMARKS.md: the same shapes as `benches/gpu.rs`, one measurement
per process, printed as one JSON line (run by `benches/gpu/run.sh`).

    python3 benches/gpu/torch_ops.py OP [--small]

OP: attention / attention128 (scaled_dot_product_attention, causal, GQA through
enable_gqa, f32 as hearth's run), linear_ce (eager: full logits, log_softmax, gather, the
hidden and head gradients), lora_sft (transformers' LlamaForCausalLM of Llama-3.2-1B's
shape with PEFT's LoRA r 16 on the seven projections, bf16, one AdamW step on 2048
tokens). Timings use CUDA events after warm-up runs; peak memory is
torch.cuda.max_memory_allocated (the run script also samples nvidia-smi for both sides).
"""

import json
import sys

import torch

WARMUP, RUNS = 3, 10


def filled(shape, k, device, dtype=torch.float32):
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, device=device, dtype=torch.int64)
    return (((i * k) % 101).to(dtype) / 101.0 - 0.5).reshape(shape)


def timed(f):
    for _ in range(WARMUP):
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(RUNS):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / RUNS / 1e3


def attention(small, d):
    b, t = (1, 128) if small else (4, 2048)
    heads = 4 if small else 2048 // d
    kv = heads // 4
    dev = "cuda"
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q, k, v = filled((b, heads, t, d), 29, dev), filled((b, kv, t, d), 31, dev), filled((b, kv, t, d), 37, dev)
    fwd = timed(lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True).sum().item())

    def both():
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        sdpa(qq, kk, vv, is_causal=True, enable_gqa=True).sum().backward()
        qq.grad.sum().item()

    fb = timed(both)
    flops = 2.0 * b * heads * t * t * d
    return {
        "shape": f"B {b}, H {heads}/{kv}, T {t}, D {d}, causal, f32",
        "forward_ms": fwd * 1e3,
        "forward_backward_ms": fb * 1e3,
        "forward_tflops": flops / fwd / 1e12,
        "forward_backward_tflops": 3.5 * flops / fb / 1e12,
    }


def linear_ce(small):
    n, h, vocab = (256, 64, 4096) if small else (8192, 2048, 128256)
    dev = "cuda"
    targets = (torch.arange(n, device=dev) * 7919) % vocab
    weight = (filled((vocab, h), 17, dev) * 0.1).requires_grad_()

    def step():
        hidden = filled((n, h), 13, dev).requires_grad_()
        logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
        lp = logp.gather(1, targets[:, None]).squeeze(1)
        (-lp.mean()).backward()
        hidden.grad.sum().item()
        weight.grad = None

    torch.cuda.reset_peak_memory_stats()
    ms = timed(step) * 1e3
    return {
        "shape": f"{n} tokens, hidden {h}, vocab {vocab}, f32, head trained",
        "forward_backward_ms": ms,
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
    }


def lora_sft(small):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        return {"unavailable": f"{e}"}
    if small:
        cfg = dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    tokens = 256 if small else 2048
    config = LlamaConfig(**cfg, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = ((torch.arange(tokens, device="cuda") * 104729) % cfg["vocab_size"])[None]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    last = {}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        last["loss"] = loss.item()

    torch.cuda.reset_peak_memory_stats()
    s = timed(step)
    return {
        "shape": f"Llama-3.2-1B-shaped{' (small)' if small else ''}, 1 x {tokens} tokens, LoRA r 16 on 7 projections, bf16",
        "step_ms": s * 1e3,
        "tokens_per_second": tokens / s,
        "last_loss": last["loss"],
        "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
    }


def main():
    args = sys.argv[1:]
    small = "--small" in args
    op = next((a for a in args if not a.startswith("--")), None)
    runs = {
        "attention": lambda: attention(small, 64),
        "attention128": lambda: attention(small, 128),
        "linear_ce": lambda: linear_ce(small),
        "lora_sft": lambda: lora_sft(small),
    }
    if op not in runs:
        print(f"usage: torch_ops.py {{{','.join(runs)}}} [--small]", file=sys.stderr)
        sys.exit(2)
    line = {"side": "pytorch", "op": op, "path": "eager" if op == "linear_ce" else "torch"}
    line.update(runs[op]())
    line["torch"] = torch.__version__
    print(json.dumps(line))


if __name__ == "__main__":
    main()
