#!/usr/bin/env bash
# hearth is built with burn's `x86-v4` (AVX-512 matmul kernels). gemm and flex pick their
# kernels at run time, so the same binary must still run where AVX-512 is missing. This
# runs it under QEMU's user-mode emulator as a Haswell (AVX2 + FMA, no AVX-512; QEMU does
# not emulate AVX-512 at all, so one such instruction ends the run with SIGILL): a tiny
# model is made, trained two steps and asked for a reply.
#
#   benches/cpu/no-avx512.sh [HEARTH]    (needs Debian's qemu-user)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
hearth=${1:-$root/target/release/hearth}
command -v qemu-x86_64 >/dev/null || { echo "needs qemu-x86_64 (apt-get install qemu-user)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
emulated() { qemu-x86_64 -cpu Haswell "$hearth" "$@"; }
grep -q avx512f /proc/cpuinfo && echo "host has AVX-512; emulating a Haswell without it" >&2
emulated init-model --out "$tmp/m" --hidden-size 64 --layers 1
emulated train "$root/recipes/tiny-sft.toml" --out "$tmp/run" \
    --set model.path="\"$tmp/m\"" --set train.max_steps=2 --set train.eval_steps=0 \
    --set train.save_steps=0 --set data.eval_fraction=0 \
    --set data.train="\"$root/data/examples/counseling-sft.jsonl\""
emulated generate --model "$tmp/m" --prompt "I feel tired." --max-new-tokens 4 >/dev/null
test -s "$tmp/run/final/adapter_model.safetensors"
echo "ok: made, trained and generated on an emulated CPU without AVX-512"
