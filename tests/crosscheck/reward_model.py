"""Manual cross-check (not run in CI): a hearth reward model's final/ loads in transformers'
AutoModelForSequenceClassification as it is, and scores conversations as `hearth reward score`.

    hearth train recipes/tiny-reward.toml --out runs/tiny-reward
    head -5 data/examples/counseling-sft.jsonl > conv.jsonl
    hearth reward score --model runs/tiny-reward/final --input conv.jsonl --out scores.jsonl
    python tests/crosscheck/reward_model.py runs/tiny-reward/final conv.jsonl scores.jsonl

Needs torch and transformers. Measured 2026-11-25: max |Δ| 2.4e-7 over 3 conversations.
"""
import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model_dir, conversations, scores = sys.argv[1:4]
model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
worst = 0.0
with open(conversations) as conv, open(scores) as ours:
    for line, score in zip(conv, ours):
        text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            theirs = model(**ids).logits[0, 0].item()
        worst = max(worst, abs(theirs - json.loads(score)["score"]))
print(f"max |transformers - hearth| = {worst:.3g}")
sys.exit(0 if worst < 1e-4 else 1)
