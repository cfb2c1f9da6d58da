# The training run the CPU benches time, sourced by compare.sh and ab-train.sh so that
# both measure the same command. Needs $hearth (the binary), $root (the repository) and
# $out (a scratch folder).

# bench_model SHAPE DIR: the bench model of SHAPE in DIR, made once, random weights (speed
# does not depend on them): "small" is the CPU issue's small Llama, "smollm2"
# SmolLM2-135M's exact shape (vocabulary 49152, tied head).
bench_model() {
    local shape=$1 dir=$2
    [ -e "$dir/config.json" ] && return
    case $shape in
    small) "$hearth" init-model --out "$dir" --hidden-size 256 --intermediate-size 688 \
        --layers 4 --heads 8 --kv-heads 4 --vocab-size 8192 ;;
    smollm2) "$hearth" init-model --out "$dir" --hidden-size 576 --intermediate-size 1536 \
        --layers 30 --heads 9 --kv-heads 3 --vocab-size 49152 --tie-embeddings ;;
    *) echo "bench_model: no shape $shape (small, smollm2)" >&2; return 2 ;;
    esac
}

# hearth_train MODEL BATCH STEPS: LoRA SFT on the bundled counseling data, packed to 256
# tokens; prints one JSON line from the run's metrics.jsonl: the median and the fastest
# step after the first two (warm-up), as PyTorch's side reports them.
hearth_train() {
    local model=$1 batch=$2 steps=$3 run
    run=$(mktemp -d "$out/run.XXXX")
    rmdir "$run"
    "$hearth" train "$root/recipes/tiny-sft.toml" --out "$run" \
        --set model.path="\"$model\"" --set model.create_if_missing=false \
        --set data.train="\"$root/data/examples/counseling-sft.jsonl\"" \
        --set data.packing=true --set data.max_length=256 --set data.eval_fraction=0 \
        --set 'lora.targets=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]' \
        --set train.per_device_train_batch_size="$batch" --set train.max_steps="$steps" \
        --set train.eval_steps=0 --set train.save_steps=0 --set train.learning_rate=1e-4 \
        ${HEARTH_TRAIN_SETS:-} >/dev/null
    # tokens_per_second counts every position of the batch (batch × 256), as PyTorch's side
    # does, so the ratio is the ratio of step times; real_tokens_per_second counts only the
    # tokens that packing filled (the rest is padding).
    python3 - "$run/metrics.jsonl" "$batch" <<'PY'
import json, statistics, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
steps = [l for l in lines if "step_time" in l][2:]
t = statistics.median(l["step_time"] for l in steps)
tok = statistics.median(l["train_tokens_per_second"] * l["step_time"] for l in steps)
print(json.dumps({"what": "train", "median_step_s": t,
                  "fastest_step_s": min(l["step_time"] for l in steps),
                  "tokens_per_second": int(sys.argv[2]) * 256 / t,
                  "real_tokens_per_second": tok / t, "real_tokens_per_step": tok,
                  "steps": len(steps)}))
PY
    rm -rf "$run"
}
