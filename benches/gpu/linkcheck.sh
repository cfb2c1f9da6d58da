#!/usr/bin/env bash
# Fails when a binary still imports a symbol that no library provides: the offline CUDA
# build links LLVM's stubs (kernels/build.rs), and a symbol they miss would stop the binary
# at start (it is linked BIND_NOW). Versioned imports (`malloc@GLIBC_2.2.5`) come from the
# system's libraries and are fine.
#
#   benches/gpu/linkcheck.sh BIN...
set -euo pipefail
status=0
for bin in "$@"; do
    missing=$(nm -D --undefined-only "$bin" | awk '$1 == "U" && $2 !~ /@/ { print $2 }')
    if [ -n "$missing" ]; then
        echo "$bin: $(echo "$missing" | wc -l) unresolved symbols:" $(echo "$missing" | head -20) >&2
        echo "  (add them to kernels/offline/llvm-symbols.txt, or run benches/gpu/refresh-symbols.sh)" >&2
        status=1
    else
        echo "$bin: no unresolved symbol"
    fi
done
exit $status
