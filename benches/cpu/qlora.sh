#!/usr/bin/env bash
# QLoRA against LoRA on this machine's CPU, side by side in one run: the same SFT recipe on
# the real SmolLM2-135M GGUF (tests/fetch-smollm2.sh), once with the frozen projections
# dense (f32) and once in NF4 (and Q8_0; `keep`: the file's own Q4_1 blocks;
# `nf4+embeddings`: the embedding table quantized too), alternated ROUNDS times. Prints the median step
# time of steps 2.. (the first compiles and warms caches), its ratio to the dense run, the
# first step's loss and the process's peak RSS.
#
#   benches/cpu/qlora.sh OUT_DIR
#
# HEARTH: the binary (default: target/release/hearth, built when missing). STEPS (default
# 5), ROUNDS (default 2), SCHEMES (default: "none nf4 q8_0 keep nf4+embeddings").
set -euo pipefail
out=$1
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
hearth=${HEARTH:-$root/target/release/hearth}
if [ ! -x "$hearth" ]; then
    (cd "$root" && cargo build --release --bin hearth)
fi
steps=${STEPS:-5}
rounds=${ROUNDS:-2}
schemes=${SCHEMES:-none nf4 q8_0 keep nf4+embeddings}
cd "$root"
for round in $(seq "$rounds"); do
    for q in $schemes; do
        run=$out/$q-$round
        rm -rf "$run"
        embeddings=false
        [[ $q == *+embeddings ]] && embeddings=true
        "$hearth" train recipes/smollm2-gguf-sft.toml --out "$run" \
            --set train.max_steps="$steps" --set train.eval_steps=0 --set train.save_steps=0 \
            --set model.quantize="\"${q%%+*}\"" --set model.quantize_embeddings=$embeddings \
            >/dev/null 2>&1
    done
done
python3 - "$out" "$rounds" $schemes <<'PY'
import json, statistics, sys
out, rounds, schemes = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def stats(q):
    times, first, peak = [], None, 0
    for r in range(1, rounds + 1):
        lines = [json.loads(l) for l in open(f"{out}/{q}-{r}/metrics.jsonl") if '"step_time"' in l]
        times += [l["step_time"] for l in lines[1:]]
        first = lines[0]["loss"]
        peak = max(peak, max(l.get("peak_memory_mb", 0) for l in lines))
    return statistics.median(times), first, peak
base = stats(schemes[0])
print("| base weights | step time (s, median) | speed vs dense | first-step loss | peak RSS (MiB) |")
print("|---|---|---|---|---|")
for q in schemes:
    t, loss, peak = stats(q)
    print(f"| {q} | {t:.2f} | {base[0] / t:.2f}x | {loss:.4f} | {peak:.0f} |")
PY
