#!/usr/bin/env bash
# Every measurement of BENCHMARKS.md on one CUDA machine, hearth and PyTorch side by side
# in the same run: each in its own process, with the GPU's memory sampled by nvidia-smi
# while it runs (the same yardstick for both sides; it includes the CUDA context and what
# each allocator keeps cached).
#
#   benches/gpu/run.sh HEARTH_GPU_BENCH OUT_DIR [--small]
#
# HEARTH_GPU_BENCH is the `gpu` bench binary built with `--features cuda`
# (`cargo bench --features cuda --bench gpu --no-run` prints its path). Results go to
# OUT_DIR/gpu.jsonl (one line per measurement, with the command that made it) and
# OUT_DIR/BENCHMARKS.md (the table). HEARTH_BENCH_DEVICE defaults to cuda.
set -u
bin=$1
out=$2
shift 2
extra=("$@")
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
results=$out/gpu.jsonl
: >"$results"
export HEARTH_BENCH_DEVICE=${HEARTH_BENCH_DEVICE:-cuda}
# Seconds each measurement may take (the GPU check gives the whole table about 4 minutes).
limit=${HEARTH_MEASURE_TIMEOUT:-300}

# Runs one measurement while sampling the GPU's used memory every 50 ms; appends its JSON
# line, with the sampled peak and the command, to the results.
measure() {
    local log
    log=$(mktemp)
    (
        while command -v nvidia-smi >/dev/null; do
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >>"$log" 2>/dev/null
            sleep 0.05
        done
    ) &
    local sampler=$!
    local line rc
    # A model step or a rollout first writes and loads a 1B model and autotunes its
    # matmuls: half as long again as one op.
    local allowed=$limit
    case " $* " in *" lora_sft"* | *" rollout "*) allowed=$((limit * 3 / 2)) ;; esac
    line=$(
        set -o pipefail
        timeout "$allowed" "$@" 2>>"$out/stderr.log" | tail -n 1
    )
    rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    local peak
    peak=$(sort -n "$log" | tail -n 1)
    rm -f "$log"
    python3 - "$line" "${peak:-}" "$*" >>"$results" <<'PY'
import json, sys
line, peak, command = sys.argv[1:4]
try:
    d = json.loads(line)
except ValueError:
    d = {"failed": command}
if peak:
    d["nvidia_smi_peak_mib"] = float(peak)
d["command"] = command
print(json.dumps(d))
PY
    echo "$* -> rc $rc" >&2
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$out/gpu.txt" 2>/dev/null
# The table is rewritten after every measurement, so a run stopped by its time limit
# still leaves the rows it finished.
table() { python3 "$here/table.py" "$results" "$out/gpu.txt" >"$out/BENCHMARKS.md"; }
for op in attention attention128 linear_ce lora_sft rollout; do
    measure "$bin" "$op" fused "${extra[@]}" && table
    # Attention through the matmuls (train.attention = "blocked") beside the flash kernel.
    case $op in
    attention | attention128 | lora_sft) measure "$bin" "$op" blocked "${extra[@]}" && table ;;
    esac
    measure "$bin" "$op" reference "${extra[@]}" && table
    measure python3 "$here/torch_ops.py" "$op" "${extra[@]}" && table
    case $op in
    linear_ce | lora_sft) measure python3 "$here/torch_ops.py" "${op}_liger" "${extra[@]}" && table ;;
    esac
done
cat "$out/BENCHMARKS.md"
# A measurement that crashed or ran out of time fails the run (one that is unavailable,
# such as PyTorch's side where torch is not installed, does not).
failed=$(grep -c '"failed"' "$results")
if [ "$failed" -gt 0 ]; then
    echo "$failed measurements failed (see $out/stderr.log)" >&2
    exit 1
fi
