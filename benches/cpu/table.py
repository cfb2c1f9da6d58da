"""CPU.md from compare.sh's cpu.jsonl: per measurement the median over rounds of each
side's tokens/s and peak RSS, hearth's ratio to PyTorch (above 1: hearth is faster; for
memory, below 1: hearth uses less), and the commands that produced them."""

import json
import statistics
import sys

TITLES = {
    "train-small": "LoRA SFT, small Llama (h 256, 4 layers, vocab 8192), 8 × 256 tokens",
    "train-smollm2": "LoRA SFT, SmolLM2-135M shape, 4 × 256 tokens",
    "gen1": "greedy generation, SmolLM2-135M shape, batch 1 × 128 new tokens",
    "gen8": "greedy generation, SmolLM2-135M shape, batch 8 × 128 new tokens",
    "rollout8": "rollout, SmolLM2-135M shape, 1 prompt × 8 sampled × 128 new tokens",
}


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    threads = sys.argv[2] if len(sys.argv) > 2 else "?"
    print(f"Threads: {threads} on both sides; medians over {max(r['round'] for r in rows)} "
          "alternated rounds.\n")
    print("| work | hearth tok/s | PyTorch tok/s | ratio | peak RSS hearth / PyTorch MiB | RSS ratio |")
    print("|---|---|---|---|---|---|")
    commands = []
    for work, title in TITLES.items():
        h = [r for r in rows if r["work"] == work and r["side"] == "hearth" and not r.get("failed")]
        t = [r for r in rows if r["work"] == work and r["side"] == "torch" and not r.get("failed")]
        if not h and not t:
            continue
        ht, tt = median(h, "tokens_per_second"), median(t, "tokens_per_second")
        hm, tm = median(h, "peak_rss_mib"), median(t, "peak_rss_mib")
        ratio = f"**{ht / tt:.2f}×**" if ht and tt else "—"
        mem = f"{hm / tm:.2f}" if hm and tm else "—"
        f = lambda x: "—" if x is None else f"{x:,.0f}"
        print(f"| {title} | {f(ht)} | {f(tt)} | {ratio} | {f(hm)} / {f(tm)} | {mem} |")
        for side in (h, t):
            if side:
                commands.append(f"- `{side[0]['command']}`")
    failed = [r for r in rows if r.get("failed")]
    if failed:
        print(f"\n{len(failed)} runs failed: " + "; ".join(r["command"] for r in failed))
    print("\nCommands:\n")
    print("\n".join(commands))


if __name__ == "__main__":
    main()
