"""Compare a `hearth logits` output file with transformers on the same inputs.

Manual check, never run in CI (it needs torch and transformers):

    python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
    hearth logits --model DIR --text "Client: I feel tired." --out out.safetensors
    .venv/bin/python tests/crosscheck/transformers_logits.py DIR out.safetensors

With `--adapter ADAPTER` (given to both; needs peft too) the model is DIR with that PEFT
adapter on it, which checks that hearth and PEFT read an adapter the same way.

Prints the largest absolute difference over unmasked positions and exits 1 above --tol.
"""

import argparse
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("logits")
    parser.add_argument("--adapter")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()

    out = load_file(args.logits)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    with torch.no_grad():
        ref = model(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits
    mask = out["attention_mask"].bool()
    diff = (ref - out["logits"]).abs()[mask].max().item()
    scale = ref.abs()[mask].mean().item()
    print(f"max |diff| = {diff:.3e} (mean |logit| {scale:.3f}, tolerance {args.tol:g})")
    return 0 if diff <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
