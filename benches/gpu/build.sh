#!/usr/bin/env bash
# The offline CUDA build of `hearth` and of the GPU bench, link-checked and packed for a GPU
# machine that has no Rust and no network (README.md in DIR says how to run them there).
#
#   benches/gpu/build.sh DIR
#
# How it builds without network: the `cuda` feature compiles kernels through NVRTC
# (`cubecl/cuda-cpp`), `DOCS_RS=1` makes cubecl-llvm skip its LLVM download, and
# kernels/build.rs links stubs for the LLVM symbols that are then missing. A cold build
# takes about half an hour on 2 cores; later ones relink in minutes.
set -euo pipefail
dir=${1:?usage: benches/gpu/build.sh DIR}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
limit_mib=60
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
cd "$root"
export DOCS_RS=1
messages=$(mktemp)
trap 'rm -f "$messages"' EXIT
cargo build --release --features cuda --bin hearth --bench gpu \
    --message-format=json-render-diagnostics >"$messages"
# The two executables, from cargo's own report (the bench's file name carries a hash).
read -r hearth bench < <(python3 - "$messages" <<'PY'
import json, sys
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        found[m["target"]["name"]] = m["executable"]
print(found["hearth"], found["gpu"])
PY
)
bash "$here/linkcheck.sh" "$hearth" "$bench"
# The stubs are in (their message is), since the real LLVM is not.
grep -q "this offline CUDA build carries no LLVM" "$hearth" || {
    echo "$hearth: the LLVM stubs are missing (was DOCS_RS set?)" >&2
    exit 1
}
# On a machine without a driver (this one, usually), `--device cuda` must end in one line
# naming the missing driver, not a panic.
if ! [ -e /dev/nvidia0 ]; then
    out=$("$hearth" selftest --small --device cuda 2>&1 >/dev/null) && status=0 || status=$?
    if [ "$status" -ne 1 ] || [ "$(printf '%s\n' "$out" | wc -l)" -ne 1 ] ||
        ! printf '%s' "$out" | grep -q "no NVIDIA CUDA driver"; then
        echo "$hearth: --device cuda without a driver did not end in one line (exit $status):" >&2
        printf '%s\n' "$out" >&2
        exit 1
    fi
    echo "driverless check: $out"
fi
total=0
for pair in "hearth:$hearth" "gpu-bench:$bench"; do
    name=${pair%%:*} bin=${pair#*:}
    strip -o "$dir/$name" "$bin"
    xz -6 -T0 -f "$dir/$name"
    size=$(stat -c %s "$dir/$name.xz")
    total=$((total + size))
    echo "$name.xz: $((size / 1024 / 1024)) MiB ($(stat -c %s "$bin") bytes unstripped)"
done
if [ "$total" -gt $((limit_mib * 1024 * 1024)) ]; then
    echo "the pack is $((total / 1024 / 1024)) MiB, over its $limit_mib MiB" >&2
    exit 1
fi
# Liger-Kernel, pure Python on triton, for PyTorch's side of the bench; optional (PyPI).
rm -f "$dir"/*.whl
if pip download --quiet --no-deps --only-binary=:all: liger-kernel -d "$dir" 2>/dev/null; then
    echo "carrying $(cd "$dir" && ls ./*.whl)"
else
    echo "liger-kernel could not be downloaded: PyTorch's side will run without Liger" >&2
fi
(cd "$dir" && sha256sum hearth.xz gpu-bench.xz ./*.whl >SHA256SUMS 2>/dev/null ||
    sha256sum hearth.xz gpu-bench.xz >SHA256SUMS)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
# The newest glibc symbol version either binary imports: what the GPU machine must have.
glibc=$(objdump -T "$hearth" "$bench" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -n 1)
glibc=${glibc#GLIBC_}
dirty=$(git -C "$root" status --porcelain 2>/dev/null | grep -q . && echo ", with uncommitted changes" || true)
cat >"$dir/README.md" <<README
# hearth for CUDA, built offline

Built by \`benches/gpu/build.sh\` from commit $commit$dirty on $(date -u +%F), for x86_64
Linux with glibc $glibc or newer. Both binaries need an NVIDIA driver (libcuda)
and a CUDA 12 or 13 toolkit's NVRTC (libnvrtc) and headers (include/cuda_fp16.h, found
through CUDA_PATH, else /usr/local/cuda) at run time, and nothing else: no Rust, no
network. \`check.sh\` finds a toolkit elsewhere (beside nvcc, or PyTorch's pip-installed
one) with \`cuda-env.sh\`; \`hearth\` says in one line what is missing. Kernels are
compiled by NVRTC on first use, so the first run of each op is slower.

- \`hearth.xz\`: the \`hearth\` command line with the \`cuda\` feature.
- \`gpu-bench.xz\`: the bench behind BENCHMARKS.md (\`benches/gpu.rs\`).
- \`liger_kernel-*.whl\` (when it could be downloaded): Liger-Kernel for PyTorch's side of
  the bench; \`check.sh\` puts it on PYTHONPATH.
- \`SHA256SUMS\`: check with \`sha256sum -c SHA256SUMS\`.

## Unpack and run

    xz -dk hearth.xz gpu-bench.xz && chmod +x hearth gpu-bench
    ./hearth selftest --device cuda           # every fused op against its reference
    ./hearth selftest --device cuda --attention blocked   # attention through the matmuls
    ./hearth train recipes/tiny-sft.toml --set 'train.device="cuda"'

## The whole GPU check

From a checkout of the same commit (the recipes, data and scripts come from the tree),
with this folder as PACK:

    benches/gpu/check.sh PACK OUT     # parity, speed beside PyTorch, short real runs

It takes under 9 minutes and writes everything to OUT, with OUT/SUMMARY.md on top.
README
echo "packed into $dir ($((total / 1024 / 1024)) MiB)"
