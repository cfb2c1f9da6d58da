#!/usr/bin/env bash
# Part 3 of the GPU check: a few steps of SFT (f32 and bf16), DPO and GRPO on a random
# model on DEVICE, each beside one step of the same recipe on the CPU, and an SFT run
# resumed on DEVICE beside the same run uninterrupted; OUT/runs.md gets one row per run
# (benches/gpu/compare_runs.py). Run from the repository root.
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
# METHOD:DTYPE[:ATTENTION]; `blocked` runs train.attention = "blocked" on the device (the
# CPU ignores it), so the matmul route through attention is checked against the CPU too.
for spec in sft:f32 sft:bf16 sft:f32:blocked dpo:f32 grpo:f32; do
    IFS=: read -r method dtype attention <<<"$spec"
    attention=${attention:-auto}
    name=$method-$dtype label=$method
    [ "$attention" = auto ] || { name+=-$attention; label+=" ($attention attention)"; }
    common=(--set "model.path=\"$model\"" --set model.create_if_missing=false
        --set train.save_steps=0 --set train.eval_steps=0 --set data.eval_fraction=0.0)
    bf=()
    [ "$dtype" = bf16 ] && bf=(--set train.bf16=true)
    "$hearth" train "recipes/tiny-$method.toml" --out "$work/$name-dev" "${common[@]}" "${bf[@]}" \
        --set "train.device=\"$device\"" --set "train.attention=\"$attention\"" \
        --set train.max_steps=3 >"$out/run-$name.log" 2>&1 || rc=1
    "$hearth" train "recipes/tiny-$method.toml" --out "$work/$name-cpu" "${common[@]}" \
        --set 'train.device="cpu"' --set train.max_steps=1 \
        >"$out/run-$name-cpu.log" 2>&1 || rc=1
    python3 "$here/compare_runs.py" "$label" "$device" "$dtype" \
        "$work/$name-dev/metrics.jsonl" "$work/$name-cpu/metrics.jsonl" >>"$report" || rc=1
done
# A resume on the device: burn reads the optimizer state on the CPU (hearth makes the CPU its
# default device) and moves it to the device at the next step. The resumed steps must give
# the uninterrupted run's losses; an optimizer state left behind or reset would not.
resume=(--set "model.path=\"$model\"" --set model.create_if_missing=false
    --set train.save_steps=2 --set train.eval_steps=0 --set data.eval_fraction=0.0
    --set "train.device=\"$device\"" --set train.max_steps=6)
"$hearth" train recipes/tiny-sft.toml --out "$work/whole" "${resume[@]}" \
    >"$out/run-sft-resume.log" 2>&1 || rc=1
mkdir -p "$work/resumed"
cp "$work/whole/recipe.toml" "$work/whole/metrics.jsonl" "$work/resumed/" 2>/dev/null &&
    cp -r "$work/whole/checkpoint-2" "$work/resumed/" 2>/dev/null || rc=1
"$hearth" train recipes/tiny-sft.toml --resume "$work/resumed" "${resume[@]}" \
    >>"$out/run-sft-resume.log" 2>&1 || rc=1
python3 "$here/compare_runs.py" "sft (resumed at step 2)" "$device" f32 \
    "$work/resumed/metrics.jsonl" "$work/whole/metrics.jsonl" --every-step >>"$report" || rc=1
cat "$report"
exit $rc
