#!/usr/bin/env python3
"""PyTorch reference figures for hearth's CPU speed comparison.

Run with the env from benches/cpu/venv.sh, e.g.
    /work/venv-torch/bin/python benches/cpu/torch_ref.py train --model DIR \
        --batch 1 --tokens 128 --steps 5 --warmup 1 --threads 2

Each subcommand prints exactly one JSON line on stdout; everything else
(library warnings, progress) goes to stderr, so callers can parse stdout as is.
The model is a Hugging Face Llama checkpoint directory (config.json +
model.safetensors, f32), the same files hearth loads.
"""
import argparse
import contextlib
import json
import resource
import statistics
import sys
import time

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForCausalLM

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_ids(rows, cols, vocab, salt=0):
    """Deterministic pseudo-random ids, no RNG involved so that the Rust side
    can build the very same batch: id[r][c] = ((r*cols + c + salt) * 2654435761
    + 12345) % vocab."""
    idx = torch.arange(rows * cols, dtype=torch.int64) + salt
    return ((idx * 2654435761 + 12345) % vocab).reshape(rows, cols)


def peak_rss_mib():
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load(model_dir, lora):
    # transformers >= 4.56 renamed torch_dtype to dtype (5.x warns on the old name).
    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{key: torch.float32})
    if lora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                         target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    return model


def common(model):
    cfg = model.config
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn": getattr(cfg, "_attn_implementation", None),
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def cmd_train(args):
    model = load(args.model, lora=True)
    model.train()
    vocab = model.config.vocab_size
    ids = token_ids(args.batch, args.tokens, vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, eps=1e-8)
    times, loss = [], None
    for step in range(args.steps):
        t0 = time.perf_counter()
        # labels = inputs: HF shifts them itself, so the loss covers T-1 positions.
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        loss = out.loss.item()
        print(f"step {step}: {times[-1]:.3f} s, loss {loss:.4f}", file=sys.stderr)
    timed = times[args.warmup:] or times  # never report a median of nothing
    median = statistics.median(timed)
    return {
        "what": "train", "batch": args.batch, "tokens": args.tokens,
        "median_step_s": median, "tokens_per_second": args.batch * args.tokens / median,
        "steps": args.steps, "warmup": args.warmup, "timed_steps": len(timed),
        "last_loss": loss, "trainable_params": sum(p.numel() for p in params),
        **common(model),
    }


def timed_generate(model, prompts, repeats, rows_out, new_tokens, **gen):
    mask = torch.ones_like(prompts)
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (
        cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0)
    kw = dict(attention_mask=mask, use_cache=True, pad_token_id=pad, **gen)
    # Warm-up: first calls pay for allocator growth and lazy initialisation.
    model.generate(prompts, max_new_tokens=min(4, new_tokens), min_new_tokens=min(4, new_tokens), **kw)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        times.append(time.perf_counter() - t0)
        print(f"generate: {times[-1]:.3f} s", file=sys.stderr)
        # min_new_tokens only holds back EOS; make sure nothing stopped early.
        assert out.shape == (rows_out, prompts.shape[1] + new_tokens), out.shape
    return statistics.median(times)


def cmd_generate(args):
    model = load(args.model, lora=args.lora).eval()
    prompts = token_ids(args.batch, args.prompt_tokens, model.config.vocab_size, salt=1)
    with torch.inference_mode():
        median = timed_generate(model, prompts, args.repeats, args.batch, args.new_tokens,
                                do_sample=False)
    return {
        "what": "generate", "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "lora": args.lora,
        "median_s": median, "tokens_per_second": args.batch * args.new_tokens / median,
        **common(model),
    }


def cmd_rollout(args):
    model = load(args.model, lora=args.lora).eval()
    prompts = token_ids(args.prompts, args.prompt_tokens, model.config.vocab_size, salt=1)
    rows = args.prompts * args.group
    with torch.inference_mode():
        # top_k=0 / top_p=1.0 switch those filters off: plain sampling from softmax.
        median = timed_generate(model, prompts, args.repeats, rows, args.new_tokens,
                                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                num_return_sequences=args.group)
    return {
        "what": "rollout", "prompts": args.prompts, "group": args.group,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "lora": args.lora, "median_s": median,
        "tokens_per_second": rows * args.new_tokens / median,
        **common(model),
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    def add(name, fn):
        p = sub.add_parser(name)
        p.set_defaults(fn=fn)
        p.add_argument("--model", required=True, help="HF Llama checkpoint directory")
        p.add_argument("--threads", type=int, required=True)
        return p

    t = add("train", cmd_train)
    t.add_argument("--batch", type=int, required=True)
    t.add_argument("--tokens", type=int, required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-4)
    for name, fn, rows in (("generate", cmd_generate, "--batch"), ("rollout", cmd_rollout, "--prompts")):
        g = add(name, fn)
        g.add_argument(rows, type=int, required=True)
        if name == "rollout":
            g.add_argument("--group", type=int, required=True)
        g.add_argument("--new-tokens", type=int, required=True)
        g.add_argument("--prompt-tokens", type=int, required=True)
        g.add_argument("--repeats", type=int, default=3)
        # Generation with unmerged LoRA adapters (B=0, so same tokens), as a
        # trainer's rollouts run; off by default: plain base model.
        g.add_argument("--lora", action="store_true")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # Keep stdout for the single JSON line, whatever libraries print.
    with contextlib.redirect_stdout(sys.stderr):
        result = args.fn(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
