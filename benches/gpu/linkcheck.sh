#!/usr/bin/env bash
# Fails when a binary imports a symbol that nothing provides: the offline CUDA build links
# LLVM's stubs (kernels/build.rs), and a symbol they miss would stop the binary at start
# (it is linked BIND_NOW). An import counts as provided when it is versioned
# (`malloc@GLIBC_2.2.5`: the system's libraries) or when one of the libraries the binary
# loads (`ldd`) defines it (Open MPI's symbols carry no version).
#
#   benches/gpu/linkcheck.sh BIN...
set -euo pipefail
status=0
for bin in "$@"; do
    imports=$(nm -D --undefined-only "$bin" | awk '$1 == "U" && $2 !~ /@/ { print $2 }' | sort -u)
    provided=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' |
        xargs -r nm -D --defined-only 2>/dev/null | awk 'NF >= 3 { sub(/@.*/, "", $3); print $3 }' | sort -u)
    missing=$(comm -23 <(echo "$imports" | sed '/^$/d') <(echo "$provided" | sed '/^$/d'))
    if [ -n "$missing" ]; then
        echo "$bin: $(echo "$missing" | wc -l) unresolved symbols:" $(echo "$missing" | head -20) >&2
        echo "  (add LLVM ones to kernels/offline/llvm-symbols.txt, or run benches/gpu/refresh-symbols.sh)" >&2
        status=1
    else
        echo "$bin: no unresolved symbol"
    fi
done
exit $status
