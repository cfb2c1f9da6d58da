#!/usr/bin/env bash
# OpenBLAS's time for a decoding step's products at a few batch sizes, with each product
# cut into one column part per thread (hearth before) or into narrow parts (hearth's
# `column_parts` in kernels/src/cpu/blas.rs). Needs gcc with OpenMP and libopenblas0.
# Usage: benches/cpu/few-rows.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bin=$(mktemp -d)/few_rows
trap 'rm -rf "$(dirname "$bin")"' EXIT
gcc -O2 -fopenmp "$here/few_rows.c" -o "$bin" /usr/lib/x86_64-linux-gnu/libopenblas.so.0
printf 'rows\twidth\tms/step\tGB/s\n'
for m in 1 4 8 16 32 48; do
    # hearth's width: 512 / m columns within 16 to 128, up to 32 rows; one part per
    # thread above.
    narrow=$((512 / m)); [ "$narrow" -ge 16 ] || narrow=16; [ "$narrow" -le 128 ] || narrow=128
    "$bin" "$m" 0
    [ "$m" -gt 32 ] || "$bin" "$m" "$narrow"
done
