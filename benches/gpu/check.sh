#!/usr/bin/env bash
# The GPU check: one command, under 9 minutes, everything into one output folder.
#
#   benches/gpu/check.sh PACK_DIR OUT_DIR [--small]
#
# PACK_DIR is what `benches/gpu/build.sh` made (hearth.xz and gpu-bench.xz). Run from the
# repository root (the recipes and bundled data are read from the tree). Three parts, each
# under its own time limit within one deadline (HEARTH_CHECK_SECONDS, 540 by default),
# each recorded whether it passes or not, so one failure never hides the others:
#   1. parity: `hearth selftest` of every fused op against its reference, values and every
#      gradient, f32 and bf16, at Llama-3.2-1B and 8B shapes (OUT/selftest.jsonl);
#   2. speed beside PyTorch on the same device (benches/gpu/run.sh: OUT/speed/);
#   3. a short real run: SFT, DPO and GRPO for a few steps on a random model, with step 1
#      against a CPU run of the same recipe (OUT/runs.md).
# OUT/SUMMARY.md says what passed. The exit status is 0 only if everything did.
#
# `--small` dry-runs the plumbing without a GPU: small shapes, on HEARTH_CHECK_DEVICE
# (default `cpu` with --small, `cuda` without).
set -u
pack=${1:?usage: benches/gpu/check.sh PACK_DIR OUT_DIR [--small]}
out=${2:?usage: benches/gpu/check.sh PACK_DIR OUT_DIR [--small]}
small=""
[ "${3:-}" = "--small" ] && small="--small"
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -n "$small" ]; then
    device=${HEARTH_CHECK_DEVICE:-cpu}
else
    device=${HEARTH_CHECK_DEVICE:-cuda}
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
summary=$out/SUMMARY.md
start=$(date +%s)
{
    echo "# GPU check ($(date -u +%FT%TZ), device $device${small:+, small})"
    echo
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
        sed 's/^/GPU: /'
} >"$summary"
# CUDA_PATH and NVRTC for CubeCL's run-time kernel compiles (cuda-env.sh says why).
# shellcheck source=benches/gpu/cuda-env.sh
. "$here/cuda-env.sh" >>"$summary"
echo >>"$summary"
status=0
record() { # NAME RC SECONDS
    local verdict=pass
    [ "$2" -eq 0 ] || { verdict="FAIL (exit $2)"; status=1; }
    [ "$2" -eq 124 ] && verdict="FAIL (ran past its time limit)"
    echo "- $1: $verdict, $3 s" >>"$summary"
    echo "== $1: $verdict, $3 s" >&2
}
stage() { # NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout "$limit" "$@"
    rc=$?
    record "$name" "$rc" "$(($(date +%s) - t0))"
}

# Unpack the binaries into a scratch folder (not OUT: they are large).
for b in hearth gpu-bench; do
    # Python's lzma where the machine has no xz.
    if ! { xz -dc "$pack/$b.xz" 2>/dev/null ||
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$pack/$b.xz"; } >"$work/$b"; then
        echo "cannot unpack $pack/$b.xz" >&2
        record "unpack $b" 1 0
        exit 1
    fi
    chmod +x "$work/$b"
done
hearth=$work/hearth
# Pure-Python wheels carried in the pack (Liger-Kernel) go on PyTorch's path.
for wheel in "$pack"/*.whl; do
    [ -e "$wheel" ] || continue
    python3 -m zipfile -e "$wheel" "$work/py" && export PYTHONPATH="$work/py${PYTHONPATH:+:$PYTHONPATH}"
done
cd "$root"

# One deadline for the whole check (HEARTH_CHECK_SECONDS): each stage may use what the
# stages before it left, less what the later ones keep for themselves, so a quick parity
# stage gives its spare time to the speed table instead of wasting it.
budget=${HEARTH_CHECK_SECONDS:-$([ -n "$small" ] && echo 1500 || echo 540)}
limit_keeping() { # SECONDS_FOR_LATER_STAGES [CAP]
    local l=$((start + budget - $(date +%s) - $1))
    [ -n "${2:-}" ] && [ "$l" -gt "$2" ] && l=$2
    [ "$l" -lt 30 ] && l=30
    echo "$l"
}
runs_keep=$([ -n "$small" ] && echo 600 || echo 100)

# 1. Parity.
stage "parity (hearth selftest)" "$(limit_keeping $((runs_keep + 200)) "$([ -n "$small" ] && echo 300 || echo 170)")" \
    "$hearth" selftest --device "$device" $small --out "$out/selftest.jsonl" \
    >"$out/selftest.txt" 2>&1

# 2. Speed beside PyTorch. Every measurement is its own process under a limit, so a slow
# one costs its limit and no more.
HEARTH_BENCH_DEVICE=$device HEARTH_MEASURE_TIMEOUT=${HEARTH_MEASURE_TIMEOUT:-40} \
    stage "speed (benches/gpu/run.sh)" "$(limit_keeping "$runs_keep")" \
    bash "$here/run.sh" "$work/gpu-bench" "$out/speed" $small >"$out/speed.log" 2>&1

# 3. A short real run per method on a random model, on the device and on the CPU.
stage "short real runs (SFT, DPO, GRPO)" "$(limit_keeping 0)" \
    bash "$here/runs.sh" "$hearth" "$device" "$out" $small >"$out/runs.log" 2>&1

{
    echo
    echo "Total: $(($(date +%s) - start)) s of $budget. Parity: selftest.txt, selftest.jsonl. Speed:"
    echo "speed/BENCHMARKS.md, speed/gpu.jsonl. Runs: runs.md and run-*.log."
} >>"$summary"
cat "$summary"
exit $status
