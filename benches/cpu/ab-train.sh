#!/usr/bin/env bash
# Two (or more) hearth binaries alternated on compare.sh's training command, to measure one
# change by itself on a noisy machine: each run prints its median and fastest step after
# two warm-up steps.
#
#   benches/cpu/ab-train.sh OUT_DIR HEARTH_A HEARTH_B [...]
#
# SHAPE: small (default) or smollm2; STEPS (default 16); ROUNDS (default 3); THREADS
# (default: every core). The model is made once under OUT_DIR/models, as compare.sh does.
set -euo pipefail
out=$1
shift
root=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$out"
shape=${SHAPE:-small}
steps=${STEPS:-16}
export RAYON_NUM_THREADS=${THREADS:-$(nproc)}
model=$out/models/$shape
case $shape in
small)
    batch=8
    [ -e "$model/config.json" ] || "$1" init-model --out "$model" --hidden-size 256 \
        --intermediate-size 688 --layers 4 --heads 8 --kv-heads 4 --vocab-size 8192 ;;
smollm2)
    batch=4
    [ -e "$model/config.json" ] || "$1" init-model --out "$model" --hidden-size 576 \
        --intermediate-size 1536 --layers 30 --heads 9 --kv-heads 3 --vocab-size 49152 \
        --tie-embeddings ;;
*) echo "ab-train.sh: SHAPE is small or smollm2, not $shape" >&2; exit 2 ;;
esac
for round in $(seq 1 "${ROUNDS:-3}"); do
    for hearth in "$@"; do
        run=$(mktemp -d "$out/run.XXXX")
        rmdir "$run"
        "$hearth" train "$root/recipes/tiny-sft.toml" --out "$run" \
            --set model.path="\"$model\"" --set model.create_if_missing=false \
            --set data.train="\"$root/data/examples/counseling-sft.jsonl\"" \
            --set data.packing=true --set data.max_length=256 --set data.eval_fraction=0 \
            --set 'lora.targets=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]' \
            --set train.per_device_train_batch_size="$batch" --set train.max_steps="$steps" \
            --set train.eval_steps=0 --set train.save_steps=0 --set train.learning_rate=1e-4 \
            >/dev/null 2>>"$out/stderr.log"
        python3 - "$run/metrics.jsonl" "$hearth" "$round" <<'PY'
import json, statistics, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
t = [l["step_time"] for l in steps if "step_time" in l][2:]
print(f"round {sys.argv[3]} {sys.argv[2]}: median {statistics.median(t):.3f} s, fastest {min(t):.3f} s")
PY
        rm -rf "$run"
    done
done
