#!/usr/bin/env bash
# Usage: benches/cpu/venv.sh DIR
#
# Creates, once, a Python virtual environment in DIR with torch, transformers
# and peft for benches/cpu/torch_ref.py (the PyTorch side of the CPU speed
# comparison). Running it again on a working DIR only prints the versions.
#
# Why it is more than `pip install torch`: PyPI's Linux torch wheel is the
# CUDA build, and its dependencies pull several GB of nvidia-* wheels plus
# triton and cuda-bindings. The CPU-only wheel lives on download.pytorch.org,
# which is tried first but is often unreachable. On the PyPI fallback the CUDA
# shared libraries cannot be skipped (libtorch_cpu.so itself links libcudart
# and libcupti, and `import torch` preloads the rest), but triton and
# cuda-bindings can: they are only for GPU kernels / torch.compile. So torch
# goes in with --no-deps and its declared requirements, less those two, go in
# after it; peft and accelerate go in the same way so that their `torch`
# requirement does not make pip pull triton back in (pip walks the
# requirements of installed packages it is asked about, so torch, and whatever
# depends on it, is left out of those requirement lists).
#
# Versions are pinned so that figures stay comparable; override with
# TORCH_SPEC, TRANSFORMERS_SPEC, PEFT_SPEC, ACCELERATE_SPEC (pip requirement
# strings). transformers 5.25.0 is not used: it requires a `kernels` version
# that PyPI does not serve.
set -euo pipefail

DIR=${1:?usage: venv.sh DIR}
TORCH_SPEC=${TORCH_SPEC:-torch==2.15.0}
TRANSFORMERS_SPEC=${TRANSFORMERS_SPEC:-transformers==5.24.0}
PEFT_SPEC=${PEFT_SPEC:-peft==0.21.2}
ACCELERATE_SPEC=${ACCELERATE_SPEC:-accelerate==1.16.0}
CPU_INDEX=https://download.pytorch.org/whl/cpu
PY="$DIR/bin/python"

# Imports everything and runs a matmul: a torch that merely installed but
# cannot load its libraries must not count as a working env.
check() {
    "$PY" - <<'EOF'
import torch, transformers, peft
a = torch.arange(16.0).reshape(4, 4)
assert torch.equal(a @ torch.eye(4), a)
print(f"torch {torch.__version__} (cuda build: {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, "
      f"threads {torch.get_num_threads()}")
EOF
}

if [ -x "$PY" ] && check 2>/dev/null; then
    exit 0
fi

start=$(date +%s)
[ -x "$PY" ] || python3 -m venv "$DIR"
pip() { "$PY" -m pip --disable-pip-version-check "$@"; }

# Prints the requirements that installed distributions declare, one per line
# (markers kept, pip evaluates them), leaving out extras and the names given
# after "--".
requirements_of() {
    "$PY" - "$@" <<'EOF'
import re, sys
from importlib.metadata import requires
args = sys.argv[1:]
cut = args.index("--")
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
skip = {norm(n) for n in args[cut + 1:]}
for dist in args[:cut]:
    for req in requires(dist) or []:
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
        if "extra ==" not in req and norm(name) not in skip:
            print(req)
EOF
}

install_no_deps_then_reqs() {
    # $1: specs to install without deps (space-separated); rest: names to skip.
    local specs=$1; shift
    local names=()
    # shellcheck disable=SC2086
    pip install -q --no-deps $specs
    for s in $specs; do names+=("$(echo "$s" | sed -E 's/[<>=!~; \[].*//')"); done
    mapfile -t reqs < <(requirements_of "${names[@]}" -- "$@")
    [ ${#reqs[@]} -eq 0 ] || pip install -q "${reqs[@]}"
}

if pip install -q --timeout 10 --retries 0 --index-url "$CPU_INDEX" \
        "$TORCH_SPEC" 2>/dev/null; then
    echo "torch: CPU-only wheel from $CPU_INDEX"
else
    echo "torch: $CPU_INDEX unreachable; CUDA wheel from PyPI, without triton and cuda-bindings"
    echo "(pip then warns that torch requires triton and cuda-bindings: expected)"
    install_no_deps_then_reqs "$TORCH_SPEC" triton cuda-bindings
fi
pip install -q "$TRANSFORMERS_SPEC"
install_no_deps_then_reqs "$PEFT_SPEC $ACCELERATE_SPEC" torch transformers peft accelerate

check
echo "env $DIR ready in $(( $(date +%s) - start )) s, $(du -sh "$DIR" | cut -f1)"
