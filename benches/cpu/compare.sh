#!/usr/bin/env bash
# hearth against PyTorch (+ PEFT, transformers) on this machine's CPU, side by side in one
# run: every shape of the CPU issue, each side in its own process, alternated, ROUNDS times;
# the table gives medians, their ratios and the commands that produced them.
#
#   benches/cpu/compare.sh OUT_DIR
#
# HEARTH: the binary (default: target/release/hearth, built when missing). VENV: the
# PyTorch environment (default OUT_DIR/venv, made on demand by venv.sh through pip).
# THREADS: threads for both sides (default: every core). ROUNDS (default 3). WORK: the
# measurements to take, space-separated (default: all of train-small train-smollm2 gen1
# gen8 rollout8). Results: OUT_DIR/cpu.jsonl (one line per run), OUT_DIR/CPU.md (the table).
set -euo pipefail
out=$1
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
hearth=${HEARTH:-$root/target/release/hearth}
# hearth_train and bench_model, shared with ab-train.sh.
source "$here/train.sh"
if [ ! -x "$hearth" ]; then
    (cd "$root" && cargo build --release --bin hearth)
fi
venv=${VENV:-$out/venv}
bash "$here/venv.sh" "$venv" >&2
py=$venv/bin/python
threads=${THREADS:-$(nproc)}
rounds=${ROUNDS:-3}
work=${WORK:-train-small train-smollm2 gen1 gen8 rollout8}
export RAYON_NUM_THREADS=$threads OMP_NUM_THREADS=$threads
results=$out/cpu.jsonl
: >"$results"

# The two model shapes (train.sh): the issue's "small" Llama and SmolLM2-135M's.
models=$out/models
bench_model small "$models/small"
bench_model smollm2 "$models/smollm2"

# Prompts for generation: one user message each, about 30 tokens once templated.
prompts() {
    local n=$1 file=$2
    python3 - "$n" >"$file" <<'PY'
import json, sys
asks = ["I have been feeling anxious about work and I cannot sleep well at night lately.",
        "My partner and I keep arguing about small things and I do not know why it happens."]
for i in range(int(sys.argv[1])):
    print(json.dumps({"prompt": asks[i % 2]}))
PY
}

# Runs one measurement under GNU time; appends its JSON line with the peak RSS and the
# command. $1: side, $2: work, $3: a command printing the JSON figures as its last line.
measure() {
    local side=$1 what=$2 round=$3
    shift 3
    local line rss
    line=$(/usr/bin/time -f '%M' -o "$out/rss.txt" "$@" 2>>"$out/stderr.log" | tail -n 1) || line=""
    rss=$(tail -n 1 "$out/rss.txt" 2>/dev/null || echo 0)
    python3 - "$side" "$what" "$round" "$line" "$rss" "$*" >>"$results" <<'PY'
import json, sys
side, what, rnd, line, rss, command = sys.argv[1:7]
try:
    d = json.loads(line)
except ValueError:
    d = {"failed": True}
d.update(side=side, work=what, round=int(rnd), peak_rss_mib=int(rss) / 1024, command=command)
print(json.dumps(d))
PY
    echo "$side $what round $round: $line" >&2
}

# hearth's generation figures: its own count of new tokens and seconds.
hearth_generate() {
    local model=$1 rows=$2 batch=$3 new=$4 temperature=$5 samples=${6:-1} file reply
    file=$(mktemp "$out/prompts.XXXX.jsonl")
    reply=$(mktemp -u "$out/replies.XXXX.jsonl")
    prompts "$rows" "$file"
    "$hearth" generate --model "$model" --input "$file" --out "$reply" --batch-size "$batch" \
        --samples "$samples" --max-new-tokens "$new" --temperature "$temperature" 2>&1 >/dev/null |
        python3 -c '
import json, re, sys
text = sys.stdin.read()
m = re.search(r"answered (\d+) prompts(?: \d+ times each)? with (\d+) tokens in ([0-9.]+) s", text)
print(json.dumps({"what": "generate", "prompts": int(m[1]), "new_tokens": int(m[2]),
                  "seconds": float(m[3]), "tokens_per_second": int(m[2]) / float(m[3])}))'
    rm -f "$file" "$reply"
}

# GNU time measures a process: the two functions above run in their own bash.
export hearth root out
export -f hearth_train hearth_generate prompts

run_work() {
    local what=$1 round=$2 side=$3
    local small=$models/small smol=$models/smollm2
    case $what:$side in
    train-small:hearth) measure hearth "$what" "$round" bash -c '"$@"' _ hearth_train "$small" 8 10 ;;
    train-small:torch) measure torch "$what" "$round" "$py" "$here/torch_ref.py" train \
        --model "$small" --batch 8 --tokens 256 --steps 10 --warmup 2 --threads "$threads" ;;
    train-smollm2:hearth) measure hearth "$what" "$round" bash -c '"$@"' _ hearth_train "$smol" 4 6 ;;
    train-smollm2:torch) measure torch "$what" "$round" "$py" "$here/torch_ref.py" train \
        --model "$smol" --batch 4 --tokens 256 --steps 6 --warmup 2 --threads "$threads" ;;
    gen1:hearth) measure hearth "$what" "$round" bash -c '"$@"' _ hearth_generate "$smol" 2 1 128 0 ;;
    gen1:torch) measure torch "$what" "$round" "$py" "$here/torch_ref.py" generate \
        --model "$smol" --batch 1 --new-tokens 128 --prompt-tokens 30 --threads "$threads" --repeats 2 ;;
    gen8:hearth) measure hearth "$what" "$round" bash -c '"$@"' _ hearth_generate "$smol" 16 8 128 0 ;;
    gen8:torch) measure torch "$what" "$round" "$py" "$here/torch_ref.py" generate \
        --model "$smol" --batch 8 --new-tokens 128 --prompt-tokens 30 --threads "$threads" --repeats 2 ;;
    # GRPO's rollouts: 8 sampled completions of one prompt, run once and decoded in one
    # batch from its shared KV cache (`generate --samples 8`, GRPO's own path).
    rollout8:hearth) measure hearth "$what" "$round" bash -c '"$@"' _ hearth_generate "$smol" 1 1 128 1.0 8 ;;
    rollout8:torch) measure torch "$what" "$round" "$py" "$here/torch_ref.py" rollout \
        --model "$smol" --prompts 1 --group 8 --new-tokens 128 --prompt-tokens 30 --threads "$threads" --repeats 2 ;;
    esac
}

# Alternate sides, and which goes first, so drift in the machine's speed falls on both.
for round in $(seq 1 "$rounds"); do
    for what in $work; do
        if [ $((round % 2)) -eq 1 ]; then
            run_work "$what" "$round" hearth
            run_work "$what" "$round" torch
        else
            run_work "$what" "$round" torch
            run_work "$what" "$round" hearth
        fi
    done
done
python3 "$here/table.py" "$results" "$threads" >"$out/CPU.md"
cat "$out/CPU.md"
