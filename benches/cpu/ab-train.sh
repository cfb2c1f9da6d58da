#!/usr/bin/env bash
# Two (or more) hearth binaries alternated on compare.sh's training command (train.sh), to
# measure one change by itself on a noisy machine: each run prints its median and fastest
# step after two warm-up steps.
#
#   benches/cpu/ab-train.sh OUT_DIR HEARTH_A HEARTH_B [...]
#
# SHAPE: small (default) or smollm2; STEPS (default 16); ROUNDS (default 3); THREADS
# (default: every core). The model is made once under OUT_DIR/models, by the first binary.
set -euo pipefail
out=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
source "$here/train.sh"
shape=${SHAPE:-small}
case $shape in
small) batch=8 ;;
smollm2) batch=4 ;;
*) echo "ab-train.sh: SHAPE is small or smollm2, not $shape" >&2; exit 2 ;;
esac
export RAYON_NUM_THREADS=${THREADS:-$(nproc)}
hearth=$1 bench_model "$shape" "$out/models/$shape"
for round in $(seq 1 "${ROUNDS:-3}"); do
    for hearth in "$@"; do
        hearth_train "$out/models/$shape" "$batch" "${STEPS:-16}" 2>>"$out/stderr.log" |
            python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
m, f = r["median_step_s"], r["fastest_step_s"]
print(f"round {sys.argv[1]} {sys.argv[2]}: median {m:.3f} s, fastest {f:.3f} s")' "$round" "$hearth"
    done
done
