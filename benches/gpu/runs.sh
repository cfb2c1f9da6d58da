#!/usr/bin/env bash
# Part 3 of the GPU check: a few steps of SFT (f32 and bf16), DPO and GRPO on a random
# model on DEVICE, each beside one step of the same recipe on the CPU; OUT/runs.md gets one
# row per run (benches/gpu/compare_runs.py). Run from the repository root.
#
#   benches/gpu/runs.sh HEARTH DEVICE OUT [--small]
set -u
hearth=$1 device=$2 out=$3 small=${4:-}
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=$work/model
if [ -n "$small" ]; then
    "$hearth" init-model --out "$model" >/dev/null || exit 1
else
    "$hearth" init-model --out "$model" --vocab-size 4096 --hidden-size 512 \
        --intermediate-size 1536 --layers 4 --heads 8 --kv-heads 2 >/dev/null || exit 1
fi
report=$out/runs.md
{
    echo "| method | device | dtype | step-1 loss | CPU step-1 loss | rel. diff | bound | losses | verdict |"
    echo "|---|---|---|---|---|---|---|---|---|"
} >"$report"
rc=0
for spec in sft:f32 sft:bf16 dpo:f32 grpo:f32; do
    method=${spec%%:*} dtype=${spec##*:}
    common=(--set "model.path=\"$model\"" --set model.create_if_missing=false
        --set train.save_steps=0 --set train.eval_steps=0 --set data.eval_fraction=0.0)
    bf=()
    [ "$dtype" = bf16 ] && bf=(--set train.bf16=true)
    "$hearth" train "recipes/tiny-$method.toml" --out "$work/$spec-dev" "${common[@]}" "${bf[@]}" \
        --set "train.device=\"$device\"" --set train.max_steps=3 \
        >"$out/run-$method-$dtype.log" 2>&1 || rc=1
    "$hearth" train "recipes/tiny-$method.toml" --out "$work/$spec-cpu" "${common[@]}" \
        --set 'train.device="cpu"' --set train.max_steps=1 \
        >"$out/run-$method-$dtype-cpu.log" 2>&1 || rc=1
    python3 "$here/compare_runs.py" "$method" "$device" "$dtype" \
        "$work/$spec-dev/metrics.jsonl" "$work/$spec-cpu/metrics.jsonl" >>"$report" || rc=1
done
cat "$report"
exit $rc
