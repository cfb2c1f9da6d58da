#!/usr/bin/env bash
# Regenerates kernels/offline/llvm-symbols.txt, the LLVM symbols the offline CUDA build
# stubs out, after a cubecl or llvm-sys upgrade: links hearth once without the stubs,
# letting unresolved symbols through, and lists what the binary then imports unversioned.
#
#   benches/gpu/refresh-symbols.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
export DOCS_RS=1 HEARTH_LLVM_STUBS=0
cargo rustc --release --features cuda --bin hearth -- \
    -C link-arg=-Wl,--unresolved-symbols=ignore-all
{
    echo "# Symbols the offline CUDA build stubs out (kernels/build.rs); made by"
    echo "# benches/gpu/refresh-symbols.sh."
    nm -D --undefined-only target/release/hearth | awk '$1 == "U" && $2 !~ /@/ { print $2 }' | sort -u
} >kernels/offline/llvm-symbols.txt
echo "kernels/offline/llvm-symbols.txt: $(grep -vc '^#' kernels/offline/llvm-symbols.txt) symbols"
