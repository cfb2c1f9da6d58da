#!/usr/bin/env bash
# Time `hearth data inspect` (render, tokenise, mask) on multi-turn conversations of growing
# length, for one or more binaries side by side: masking cost should grow with a
# conversation's length, not its square.
#
#   benches/cpu/masking.sh OUT BIN [BIN...]
#
# Writes OUT/masking.tsv: binary, exchanges per conversation, conversations, seconds.
set -euo pipefail
out=${1:?usage: masking.sh OUT BIN [BIN...]}
shift
[ $# -ge 1 ] || { echo "masking.sh: name at least one hearth binary" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
tokenizer=${TOKENIZER:-$root/../shared/fixtures/chat-template/llama3}
mkdir -p "$out"
# The same words for every length, so only the number of turns changes.
python3 - "$out" <<'PY'
import json, random, sys
random.seed(0)
words = ("feel anxious work sleep mother talk week better sometimes worry think really "
         "know maybe always never help try breathe notice moment").split()
def sentence(n):
    return " ".join(random.choice(words) for _ in range(n)).capitalize() + "."
for exchanges, rows in [(20, 200), (80, 20), (250, 2), (1000, 1)]:
    with open(f"{sys.argv[1]}/talk{exchanges}.jsonl", "w") as f:
        for _ in range(rows):
            msgs = [{"role": "system", "content": "You are a counselor."}]
            for _ in range(exchanges):
                msgs.append({"role": "user", "content": sentence(40)})
                msgs.append({"role": "assistant", "content": sentence(60)})
            f.write(json.dumps({"messages": msgs}) + "\n")
PY
printf 'binary\texchanges\tconversations\tseconds\n' > "$out/masking.tsv"
for exchanges in 20 80 250 1000; do
  file=$out/talk$exchanges.jsonl
  for bin in "$@"; do
    start=$(date +%s.%N)
    "$bin" data inspect "$file" --tokenizer "$tokenizer" --max-length 10000000 > /dev/null
    end=$(date +%s.%N)
    printf '%s\t%s\t%s\t%.2f\n' "$bin" "$exchanges" "$(wc -l < "$file")" \
      "$(echo "$end - $start" | bc)" >> "$out/masking.tsv"
  done
done
column -t "$out/masking.tsv"
