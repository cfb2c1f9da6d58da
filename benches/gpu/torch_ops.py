"""PyTorch's side of BENCHMARKS.md: the same shapes as `benches/gpu.rs`, one measurement
per process, printed as one JSON line (run by `benches/gpu/run.sh`).

    python3 benches/gpu/torch_ops.py OP [--small]

OP: attention / attention128 (scaled_dot_product_attention, causal, GQA through
enable_gqa, f32 as hearth's run), linear_ce (eager: full logits, log_softmax, gather, the
hidden and head gradients), lora_sft (transformers' LlamaForCausalLM of Llama-3.2-1B's
shape with PEFT's LoRA r 16 on the seven projections, bf16, one AdamW step on 2048
tokens), rollout (that model's `generate` with `num_return_sequences=8`, sampling 256 new
tokens after a 64-token prompt, bf16, never stopping early). Timings use CUDA events after
warm-up runs; peak memory is torch.cuda.max_memory_allocated (the run script also samples
nvidia-smi for both sides). linear_ce_liger and lora_sft_liger run the same with
Liger-Kernel (its fused linear cross-entropy; patched into transformers' Llama) when it is
importable, and say "unavailable" otherwise. Without CUDA (a `--small` dry run on a CPU) the same runs are
timed on the CPU, so the plumbing can be checked anywhere torch is installed.
"""

import json
import sys
import time

try:
    import torch
except ImportError as e:  # a dry run where torch is not installed: say so, do not fail
    op = next((a for a in sys.argv[1:] if not a.startswith("--")), "")
    path = "liger" if op.endswith("_liger") else "torch"
    print(json.dumps({"side": "pytorch", "op": op.removesuffix("_liger"), "path": path,
                      "unavailable": str(e)}))
    sys.exit(0)

WARMUP, RUNS = 3, 10
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def filled(shape, k, device, dtype=torch.float32):
    n = 1
    for s in shape:
        n *= s
    i = torch.arange(n, device=device, dtype=torch.int64)
    return (((i * k) % 101).to(dtype) / 101.0 - 0.5).reshape(shape)


def timed(f, warmup=WARMUP, runs=RUNS):
    if DEV == "cpu":
        for _ in range(warmup):
            f()
        start = time.perf_counter()
        for _ in range(runs):
            f()
        return (time.perf_counter() - start) / runs
    for _ in range(warmup):
        f()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / runs / 1e3


def peak_mib():
    return torch.cuda.max_memory_allocated() / 2**20 if DEV == "cuda" else None


def reset_peak():
    if DEV == "cuda":
        reset_peak()


def attention(small, d):
    b, t = (1, 128) if small else (4, 2048)
    heads = 4 if small else 2048 // d
    kv = heads // 4
    dev = DEV
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


def linear_ce(small, liger=False):
    n, h, vocab = (256, 64, 4096) if small else (8192, 2048, 128256)
    dev = DEV
    targets = (torch.arange(n, device=dev) * 7919) % vocab
    weight = (filled((vocab, h), 17, dev) * 0.1).requires_grad_()
    if liger:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError as e:
            return {"unavailable": f"{e}"}
        fused = LigerFusedLinearCrossEntropyLoss()

    def step():
        hidden = filled((n, h), 13, dev).requires_grad_()
        if liger:
            loss = fused(weight, hidden, targets)
        else:
            logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
            loss = -logp.gather(1, targets[:, None]).squeeze(1).mean()
        loss.backward()
        hidden.grad.sum().item()
        weight.grad = None

    reset_peak()
    ms = timed(step) * 1e3
    return {
        "shape": f"{n} tokens, hidden {h}, vocab {vocab}, f32, head trained",
        "forward_backward_ms": ms,
        "peak_allocated_mib": peak_mib(),
    }


def random_llama(small):
    """A random LlamaForCausalLM of Llama-3.2-1B's shape (tiny with `small`), bf16, and its
    vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)
    else:
        cfg = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64)
    config = LlamaConfig(**cfg, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(DEV, torch.bfloat16), cfg["vocab_size"]


def lora_sft(small, liger=False):
    try:
        from peft import LoraConfig, get_peft_model
        if liger:
            # Liger's fused linear-CE, RMSNorm, SwiGLU and RoPE patched into transformers'
            # Llama before the model is built.
            from liger_kernel.transformers import apply_liger_kernel_to_llama
            apply_liger_kernel_to_llama()
        model, vocab = random_llama(small)
    except ImportError as e:
        return {"unavailable": f"{e}"}
    tokens = 256 if small else 2048
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = ((torch.arange(tokens, device=DEV) * 104729) % vocab)[None]
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    last = {}

    def step():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        last["loss"] = loss.item()

    reset_peak()
    s = timed(step)
    return {
        "shape": f"Llama-3.2-1B-shaped{' (small)' if small else ''}, 1 x {tokens} tokens, LoRA r 16 on 7 projections, bf16",
        "step_ms": s * 1e3,
        "tokens_per_second": tokens / s,
        "last_loss": last["loss"],
        "peak_allocated_mib": peak_mib(),
    }


def rollout(small):
    try:
        model, vocab = random_llama(small)
    except ImportError as e:
        return {"unavailable": f"{e}"}
    model.eval()
    prompt_len, new_tokens, g = (16, 32, 8) if small else (64, 256, 8)
    ids = ((torch.arange(prompt_len, device=DEV) * 104729) % vocab)[None]
    counted = {}

    @torch.no_grad()
    def run():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                             top_k=0, top_p=1.0, num_return_sequences=g, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0)
        counted["tokens"] = (out.shape[1] - prompt_len) * out.shape[0]

    reset_peak()
    s = timed(run, warmup=1, runs=3)
    return {
        "shape": f"Llama-3.2-1B-shaped{' (small)' if small else ''}, {g} x {new_tokens} new tokens after {prompt_len}, sampled, bf16",
        "rollout_ms": s * 1e3,
        "tokens_per_second": counted["tokens"] / s,
        "peak_allocated_mib": peak_mib(),
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
        "rollout": lambda: rollout(small),
        "linear_ce_liger": lambda: linear_ce(small, liger=True),
        "lora_sft_liger": lambda: lora_sft(small, liger=True),
    }
    if op not in runs:
        print(f"usage: torch_ops.py {{{','.join(runs)}}} [--small]", file=sys.stderr)
        sys.exit(2)
    # Liger's runs sit in their op's table as another PyTorch path.
    path = "liger" if op.endswith("_liger") else "eager" if op == "linear_ce" else "torch"
    line = {"side": "pytorch", "op": op.removesuffix("_liger"), "path": path}
    line.update(runs[op]())
    line["torch"] = torch.__version__
    line["torch_device"] = DEV
    print(json.dumps(line))


if __name__ == "__main__":
    main()
